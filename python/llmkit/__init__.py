"""llmkit: the modern-LLM pipeline on C++/CUDA kernels exposed as torch ops.

Importing llmkit loads its compiled extension (``llmkit._C``), which registers
every op under ``torch.ops.llmkit``. The extension is tied to the torch it was
compiled against; a different torch gets a clear "rebuild" error here instead
of an undefined-symbol crash.
"""

from __future__ import annotations

import importlib.metadata

import torch

try:  # one source: the installed metadata (0.1.0+torch2.14.1.cu130; cmake/llmkit_metadata.py writes it)
    __version__ = importlib.metadata.version("llmkit")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that pip never installed
    __version__ = "0+unknown"

_REBUILD_HINT = (
    "rebuild llmkit against the installed torch: pip install --no-build-isolation --force-reinstall --no-deps ."
)

try:
    from . import _build_config
except ImportError as exc:  # source tree without a build
    raise ImportError(f"llmkit's compiled extension is not built ({exc}); {_REBUILD_HINT}") from None


def _same_torch(built: str, installed: str) -> bool:
    # The C++ ABI changes between torch releases; local tags (+cu130) must match too.
    return built == installed


if not _same_torch(_build_config.TORCH_VERSION, torch.__version__):
    raise ImportError(
        f"llmkit was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} "
        f"is installed; {_REBUILD_HINT}"
    )

try:
    from . import _C  # noqa: F401  (registers torch.ops.llmkit.*)
except ImportError as exc:
    raise ImportError(f"llmkit's compiled extension failed to load: {exc}; {_REBUILD_HINT}") from exc

from . import ops  # noqa: E402


def build_info() -> dict:
    """What this build of llmkit holds: backends compiled in, the torch it was
    built against, and the CUDA architectures of its kernels."""
    with_cuda = bool(_C.built_with_cuda())
    return {
        "version": __version__,
        "cpu": True,
        "cuda": with_cuda,
        "cuda_archs": _C.cuda_archs.split() if with_cuda else [],
        "cuda_compiler": _build_config.CUDA_COMPILER_VERSION if with_cuda else None,
        "torch": _C.torch_version,
        "torch_cuda": _build_config.TORCH_CUDA_VERSION or None,
        "cxx_compiler": _build_config.CXX_COMPILER,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["build_info", "ops", "__version__"]

from . import nn  # noqa: E402
from . import integrations  # noqa: E402
from .nn.functional import sdpa  # noqa: E402  (drop-in for F.scaled_dot_product_attention)
from .ops.flash_attn_interface import *  # noqa: E402,F401,F403  (flash_attn_func & co., flash-attn 2's call sites)

# transformers already imported: make attn_implementation="llmkit" available now. Otherwise
# import llmkit.integrations.transformers (or call its register()) after importing it.
integrations.register_available()
from . import models  # noqa: E402
from .generation import generate, stream  # noqa: E402  (llmkit.generate / llmkit.stream)

__all__ += ["nn", "integrations", "sdpa", "models", "generate", "stream", *ops.flash_attn_interface.__all__]
