"""Progress bars: one factory so every long loop behaves the same way.

Bars go to stderr and switch themselves off when stderr is not a terminal (a
log file, a pipe, CI), where tqdm's carriage returns would only make noise;
``LLMKIT_PROGRESS=1`` forces them on, ``=0`` off. A caller's explicit
``disable=True`` always wins (``progress=False`` arguments).
"""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled() -> bool | None:
    """True / False when LLMKIT_PROGRESS forces it, else None (tqdm decides: on for a terminal)."""
    value = os.environ.get("LLMKIT_PROGRESS", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on stderr, off when stderr is not a terminal.

    ``disable=True`` turns it off whatever the terminal; otherwise
    ``LLMKIT_PROGRESS`` decides, else whether stderr is a TTY.
    """
    from tqdm.auto import tqdm

    forced = progress_enabled()
    if disable:
        off: bool | None = True
    elif forced is not None:
        off = not forced
    else:
        off = None  # tqdm: disable on a non-TTY file
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=off, **kwargs)
