"""llmkit.nn: torch.nn building blocks on llmkit's kernels.

:func:`sdpa` is a drop-in for ``torch.nn.functional.scaled_dot_product_attention``;
:class:`Attention` a Llama-style attention layer; :class:`RotaryEmbedding` /
:func:`apply_rotary` RoPE in Hugging Face's convention; :class:`Linear4bit` an
NF4 (QLoRA) linear layer compatible with bitsandbytes'; :class:`LoraLinear` a
LoRA adapter over a linear layer in PEFT's conventions.
"""

from . import functional
from .attention import Attention
from .functional import sdpa
from .linear4bit import Linear4bit, LinearNF4
from .lora import LoraLinear
from .rope import RotaryEmbedding, apply_rotary, rotate_half

__all__ = ["Attention", "Linear4bit", "LinearNF4", "LoraLinear", "RotaryEmbedding", "apply_rotary", "rotate_half",
           "sdpa", "functional"]
