"""Atomic saves: the one helper every file and directory llmkit writes goes through.

A save happens whole or not at all. Whatever instant the process is killed at,
a reader finds the previous file (or directory) exactly as it was, or the new
one complete -- never a mix of the two, never a truncated file under the real
name.

- :func:`atomic_write` (one file): the bytes go to a temporary file in the
  same directory (same filesystem, so the rename is atomic), are fsync'ed, get
  the permissions a plain ``open()`` would have given them (the umask, or the
  replaced file's mode: ``mkstemp`` alone would leave 0600), and are renamed
  over the target with ``os.replace``; the directory entry is fsync'ed too.
- :func:`atomic_directory` (a multi-file artefact: a model, an adapter, a
  checkpoint, a shard set): the block writes into an empty sibling directory;
  files of the existing directory that the block did not write (a tokenizer
  saved beside a model, say) are carried over as hard links (copies across
  filesystems), so saving into a directory never deletes what else a user
  keeps there; then the new directory takes the old one's place in one step
  with ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15 on ext4, xfs, btrfs,
  tmpfs), and the old content is removed. Where the exchange is unsupported,
  the old directory is renamed aside and the new one renamed in; a kill
  between those two renames leaves the target missing and the old directory
  complete beside it as ``.NAME.old-*``, which :func:`recover_directory` (run
  by every later save, and by loaders that call it) puts back.

Nothing here deletes a user's file on failure: on an exception the temporary
file or directory is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = ["atomic_write", "atomic_directory", "recover_directory", "write_bytes", "write_text", "write_json",
           "default_mode"]


def _umask() -> int:
    # /proc/self/status reads it without changing it (os.umask(0) + restore races other threads).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / directory under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object whose content replaces `path` only when the ``with`` block completes.

    ``mode`` is ``"wb"`` or ``"w"`` (text, `encoding` default UTF-8). The parent
    directory must exist. On any exception (KeyboardInterrupt included) `path`
    is left as it was and the temporary file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    try:
        file_mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        file_mode = default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `obj` as JSON (with a final newline) to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


# ------------------------------------------------------------------------------------- directories

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step; False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _old_copies(path: str) -> list[str]:
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent or ".")
    except FileNotFoundError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if e.startswith(f".{name}.old-"))


def recover_directory(path: str | os.PathLike) -> bool:
    """Put back a directory a save was replacing when it was killed (the two-rename fallback).

    Returns True when something was restored. Called by :func:`atomic_directory`
    before every save; loaders may call it to read what a killed save left.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        return False
    olds = _old_copies(path)
    if not olds:
        return False
    newest = max(olds, key=os.path.getmtime)
    os.rename(newest, path)
    return True


def _fsync_tree(root: str) -> None:
    for parent, dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(parent, name)
            if os.path.islink(full):
                continue
            with contextlib.suppress(OSError):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_directory(parent)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, new: str, discard: tuple[str, ...] = ()) -> None:
    """Bring into `new` every entry of `old` that `new` does not have (recursively for directories),
    but for top-level names matching a `discard` glob."""
    for entry in os.scandir(old):
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in discard):
            continue
        target = os.path.join(new, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if os.path.lexists(target):
                if os.path.isdir(target) and not os.path.islink(target):
                    _carry_over(entry.path, target)
                continue
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        elif not os.path.lexists(target):
            _link_or_copy(entry.path, target)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing: bool = True,
                     discard: Iterable[str] = ()) -> Iterator[Path]:
    """An empty directory to write into; it becomes `path` when the ``with`` block completes.

    With ``keep_existing`` (the default), entries of an existing `path` that the
    block did not write are carried over (hard links, or copies across
    filesystems), so a save never deletes a user's other files; with False the
    new directory holds exactly what the block wrote. `discard`: glob patterns of
    top-level names not carried over (stale weight shards of an older save, say).
    `path`'s parent is
    created if missing. On an exception `path` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"cannot save to {path}: it exists and is not a directory")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    recover_directory(path)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        try:
            dir_mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            dir_mode = default_mode(directory=True)
        os.chmod(tmp, dir_mode)
        yield Path(tmp)
        exists = os.path.isdir(path)
        if exists and keep_existing:
            _carry_over(path, tmp, tuple(discard))
        _fsync_tree(tmp)
        if not exists:
            os.rename(tmp, path)
            tmp = None
        elif _exchange(tmp, path):
            pass  # tmp now holds the old content, removed below
        else:
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        _fsync_directory(parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
