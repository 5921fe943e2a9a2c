"""llmkit ops: Python entry points of ``torch.ops.llmkit.*``.

Each op has a C++ (CPU) and a CUDA kernel registered in csrc/, a fake kernel
for torch.compile, and a pure-PyTorch reference in :mod:`llmkit.ops.reference`.
"""

from . import reference
from .attention import flash_attention, flash_attention_varlen
from . import flash_attn_interface
from .flash_attn_interface import *  # noqa: F401,F403  (flash_attn_func & co.: flash-attn 2's names)
from .lora import lora_dropout, lora_linear
from .activation import gelu_tanh
from .linear import decode_linear, linear_gemv
from .loss import cross_entropy_fused_
from .quant import dequantize_nf4, nf4_linear, quantize_blockwise_8bit, quantize_nf4
from .quant_state import NestedState, NF4State, dynamic_map, nf4_code

__all__ = [
    "flash_attention",
    "flash_attention_varlen",
    *flash_attn_interface.__all__,
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_blockwise_8bit",
    "nf4_linear",
    "lora_linear",
    "lora_dropout",
    "cross_entropy_fused_",
    "linear_gemv",
    "gelu_tanh",
    "decode_linear",
    "NF4State",
    "NestedState",
    "dynamic_map",
    "nf4_code",
    "reference",
]
