"""What every layer of llmkit shares: atomic saves, progress bars, the package logger.

Imported by ops, nn, models and everything above them; imports nothing of llmkit.
"""

from __future__ import annotations

import logging

from .atomic import atomic_directory, atomic_write, recover_directory, write_bytes, write_json, write_text
from .progress import progress_bar

# Library messages go through logging ("llmkit.<module>"); the application decides what to show.
# The `llmkit` command configures INFO to stderr; an importing program sees nothing unless it asks.
logging.getLogger("llmkit").addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger of an llmkit module (``get_logger(__name__)``)."""
    return logging.getLogger(name if name.startswith("llmkit") else f"llmkit.{name}")


__all__ = ["atomic_directory", "atomic_write", "recover_directory", "write_bytes", "write_json", "write_text",
           "progress_bar", "get_logger"]


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise an ImportError that says which extra installs it.

    ``plt = require("matplotlib.pyplot", "plot", "loss curves")``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(f"{purpose} needs {top}, which is not installed: pip install 'llmkit[{extra}]' "
                          f"(or pip install {top})") from exc


def optional(module: str):
    """The module if it imports, else None (for features that are skipped without it, with a log line)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


__all__ += ["require", "optional"]
