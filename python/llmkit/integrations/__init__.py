"""Bridges from llmkit's kernels to other libraries.

Each submodule imports its library lazily (only when the submodule itself is
imported), so ``import llmkit`` stays fast: :mod:`llmkit.integrations.transformers`
registers ``attn_implementation="llmkit"`` with Hugging Face transformers.
"""

import sys
import warnings


def register_available() -> None:
    """Register with the libraries that are already imported (called by ``import llmkit``)."""
    if sys.modules.get("transformers") is not None:  # None: an import that was blocked
        try:
            from . import transformers  # noqa: F401  (registers on import)
        except Exception as exc:  # a transformers too old or half-imported must not break import llmkit
            warnings.warn(f"llmkit: could not register with transformers: {exc!r}", stacklevel=2)
