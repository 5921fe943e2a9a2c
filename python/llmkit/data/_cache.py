"""What the on-disk caches of llmkit.data and llmkit.train share: one builder
per entry at a time, and the removal of what a killed builder left.

An entry (a tokenized corpus, a trained tokenizer) is a directory written
through :func:`llmkit.utils.atomic_directory`: it appears complete or not at
all. A builder holds an exclusive ``flock`` on ``.NAME.lock`` beside the entry
while it builds, so that

- two processes asking for the same missing entry build it once (the second
  waits, then finds it), and
- the temporary directories of a builder that was killed (``.NAME.tmp-*``,
  which nothing else removes) are deleted by the next builder: holding the
  lock proves that nobody is writing them.

The kernel drops the lock when its holder dies, kill -9 included. Where
``fcntl`` does not exist (not Linux / macOS) builds are not serialised and
leftovers stay; entries are still atomic.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def build_lock(entry: Path) -> Iterator[None]:
    """Hold the exclusive build lock of cache entry `entry` (blocking)."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(entry.parent / f".{entry.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def remove_leftovers(entry: Path) -> None:
    """Delete the temporary directories killed builds of `entry` left (call it holding the build lock),
    and `entry` itself when it is not a directory (a cache entry is always one)."""
    entry = Path(entry)
    if fcntl is not None:
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if (entry.is_symlink() and not entry.exists()) or (entry.exists() and not entry.is_dir()):
        os.unlink(entry)  # a file or a broken link where the entry's directory belongs
