"""llmkit.nn: torch.nn building blocks on llmkit's kernels.

:func:`sdpa` is a drop-in for ``torch.nn.functional.scaled_dot_product_attention``;
:class:`Attention` a Llama-style attention layer; :class:`RotaryEmbedding` /
:func:`apply_rotary` RoPE in Hugging Face's convention.
"""

from . import functional
from .attention import Attention
from .functional import sdpa
from .rope import RotaryEmbedding, apply_rotary, rotate_half

__all__ = ["Attention", "RotaryEmbedding", "apply_rotary", "rotate_half", "sdpa", "functional"]
