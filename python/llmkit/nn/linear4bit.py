"""A linear layer whose frozen weight is stored in NF4 (QLoRA), bitsandbytes-compatible.

`Linear4bit` follows ``bitsandbytes.nn.Linear4bit(..., quant_type="nf4")``:
the weight is quantized blockwise to 4-bit NormalFloat (two codes a byte,
shape ``((n+1)//2, 1)``), by default with double quantization of the absmax
(``compress_statistics=True``), and the forward dequantizes on the fly in the
compute dtype. Its ``state_dict`` has bitsandbytes' keys and bytes::

    weight                                    uint8 ((n+1)//2, 1)
    bias                                      (out_features,)
    weight.absmax                             uint8 (double quant) or float32
    weight.quant_map                          float32 (16,)  the NF4 values
    weight.nested_absmax                      float32        (double quant)
    weight.nested_quant_map                   float32 (256,) (double quant)
    weight.quant_state.bitsandbytes__nf4      uint8          JSON of the rest

so a bitsandbytes Linear4bit checkpoint loads here with ``load_state_dict``,
and ours loads into bitsandbytes through ``Params4bit.from_prequantized`` (the
way transformers does it). A dense ``nn.Linear`` state_dict loads too: its
weight is quantized on load.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import ops
from ..ops import NF4State, dequantize_nf4, quantize_nf4
from ..ops.quant import check_quant_type

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): a linear layer whose weight
    is stored transposed, (in_features, out_features). Checked without
    importing transformers: a model can only hold one if it is imported."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of an ``nn.Linear`` or a
    ``Conv1D`` (a transposed view for the latter: no copy)."""
    if not module.weight.is_floating_point():
        # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear around packed integer weights.
        raise TypeError(f"{type(module).__module__}.{type(module).__name__} holds a {module.weight.dtype} (quantized) "
                        "weight; for a bitsandbytes NF4 layer, load its state_dict into llmkit.nn.Linear4bit("
                        "in_features, out_features) and use that")
    return module.weight.T if is_conv1d(module) else module.weight


class Linear4bit(nn.Module):
    """``y = x @ dequant(W).T + bias`` with W frozen in NF4.

    The constructor has ``bitsandbytes.nn.Linear4bit``'s signature (0.50),
    positions included, so its call sites run unchanged; llmkit's own
    options (``blocksize``, and ``double_quant``, its older name for
    compress_statistics) are keyword-only.

    Args:
        input_features, output_features, bias: as ``nn.Linear``'s in/out
            features and bias (the weight is initialised like
            ``nn.Linear``'s, then quantized).
        compute_dtype: dtype the matmul runs in (x is cast to it and the
            output cast back to x's dtype, as bitsandbytes does). Defaults to
            the dtype the weight had before quantization.
        compress_statistics: quantize the absmax too (double quantization):
            4.127 instead of 4.5 bits per weight.
        quant_type: "nf4". bitsandbytes' default is "fp4", a format llmkit
            does not implement, so llmkit's default is "nf4" (what QLoRA and
            transformers' ``bnb_4bit_quant_type="nf4"`` use); "fp4" raises
            NotImplementedError.
        quant_storage: torch.uint8 (other storage dtypes: NotImplementedError).
        device: where the weight lives.
        blocksize: NF4 block (a power of two, 32 to 4096; QLoRA uses 64).
        double_quant: alias of compress_statistics.

    The packed weight is a frozen uint8 ``nn.Parameter`` named ``weight``
    (like bitsandbytes' ``Params4bit``, so ``parameters()`` lists it) and the
    :class:`~llmkit.ops.NF4State` is ``self.quant_state``; ``.to(device)``
    moves both.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: torch.dtype | None = None, compress_statistics: bool = True,
                 quant_type: str = "nf4", quant_storage: torch.dtype = torch.uint8, device=None, *,
                 blocksize: int = 64, double_quant: bool | None = None):
        super().__init__()
        check_quant_type(quant_type, quant_storage)
        if double_quant is not None:
            if double_quant != compress_statistics and not compress_statistics:
                raise ValueError("compress_statistics=False and double_quant=True disagree; double_quant is "
                                 "llmkit's name for compress_statistics: give one")
            compress_statistics = double_quant
        dense = nn.Linear(input_features, output_features, bias=bias, device=device)
        self._init_from(dense.weight.detach(), dense.bias, compute_dtype, blocksize, bool(compress_statistics))

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None,
                    blocksize: int = 64, double_quant: bool = True) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (or transformers' ``Conv1D``, transposed)
        into a new Linear4bit on the same device; the bias is copied."""
        if isinstance(linear, Linear4bit):
            raise TypeError("from_linear got a Linear4bit: it is quantized already")
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        weight = dense_weight(linear).detach()
        self._init_from(weight, linear.bias, compute_dtype, blocksize, double_quant)
        return self

    def _init_from(self, weight: torch.Tensor, bias, compute_dtype, blocksize: int, double_quant: bool) -> None:
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"the weight to quantize must be float32, float16 or bfloat16, got {weight.dtype}")
        if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        packed, state = quantize_nf4(weight.contiguous(), blocksize=blocksize, double_quant=double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state: NF4State = state
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    # ------------------------------------------------------------- compute --

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: ``compute_dtype`` or the weight's original dtype."""
        return self.compute_dtype or self.quant_state.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return ops.nf4_linear(x.to(dtype), self.weight, self.quant_state, bias).to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision (out_features, in_features) weight, in `dtype`
        (default: the dtype it had before quantization)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the weight by NF4(`weight`), keeping blocksize, double quant
        and the original dtype (what LoRA merging into 4 bits does)."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        packed, state = quantize_nf4(weight.to(self.quant_state.dtype).contiguous(), self.blocksize, self.double_quant)
        self.weight.data = packed
        self.quant_state = state

    def nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes plus the state (absmax,
        nested absmax, offset; not the code tables, shared by every layer)."""
        return self.weight.numel() * self.weight.element_size() + self.quant_state.nbytes()

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .cuda() reach parameters only: bring the state along.
        # Dtype casts (.half()) touch float parameters only; the state keeps its fp32 absmax.
        super()._apply(fn, recurse)
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    # --------------------------------------------------------- state dict --

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            quant = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
            try:
                packed, state = self._weight_from_state(state_dict[key], quant)
            except (ValueError, TypeError, KeyError) as e:
                error_msgs.append(f"While loading {key!r}: {e}")
            else:
                self.weight.data = packed.to(self.weight.device)
                self.quant_state = state.to(self.weight.device)

        bias_key = prefix + "bias"
        if strict:  # as nn.Module's loader: our keys that name neither the weight (and its state) nor the bias
            known = ("weight", "bias") if self.bias is not None else ("weight",)
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] not in known)
        if self.bias is None:
            pass
        elif bias_key not in state_dict:
            missing_keys.append(bias_key)
        else:
            bias = state_dict[bias_key]
            if bias.shape != self.bias.shape:
                error_msgs.append(f"size mismatch for {bias_key}: copying a param with shape {tuple(bias.shape)} "
                                  f"from checkpoint, the shape in current model is {tuple(self.bias.shape)}.")
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)

    def _weight_from_state(self, weight: torch.Tensor, quant: dict) -> tuple[torch.Tensor, NF4State]:
        """(packed, state) from a state_dict's ``weight`` and ``weight.*`` entries:
        bitsandbytes' NF4 layout, or a dense weight to quantize."""
        shape = (self.out_features, self.in_features)
        if not quant:
            if weight.dtype == torch.uint8:
                raise ValueError("a uint8 (packed) weight needs its quant state "
                                 "(weight.absmax, weight.quant_state.bitsandbytes__nf4, ...)")
            if tuple(weight.shape) != shape:
                raise ValueError(f"dense weight has shape {tuple(weight.shape)}, expected {shape}")
            return quantize_nf4(weight.contiguous(), self.blocksize, self.double_quant)
        if any(k.endswith("bitsandbytes__fp4") for k in quant):
            raise ValueError("the checkpoint holds an FP4 weight (quant_type='fp4'); Linear4bit reads NF4 only")
        state = NF4State.from_dict(quant)  # raises for fp4 / missing fields
        if tuple(state.shape) != shape:
            raise ValueError(f"quant state is for a weight of shape {tuple(state.shape)}, this layer's is {shape}")
        n = state.numel
        if weight.dtype != torch.uint8 or tuple(weight.shape) != ((n + 1) // 2, 1):
            raise ValueError(f"packed weight must be uint8 of shape {((n + 1) // 2, 1)}, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        blocks = (n + state.blocksize - 1) // state.blocksize
        if state.absmax.numel() != blocks:
            raise ValueError(f"absmax has {state.absmax.numel()} entries, expected {blocks} "
                             f"(blocksize {state.blocksize})")
        if state.state2 is not None:
            nested = (blocks + state.state2.blocksize - 1) // state.state2.blocksize
            if state.absmax.dtype != torch.uint8 or state.state2.absmax.numel() != nested:
                raise ValueError(f"double-quant state must have uint8 absmax and {nested} nested absmax, got "
                                 f"{state.absmax.dtype} and {state.state2.absmax.numel()}")
        elif state.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quant, got {state.absmax.dtype}")
        self.blocksize, self.double_quant = state.blocksize, state.nested
        return weight.contiguous(), state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.dtype}")


class LinearNF4(Linear4bit):
    """bitsandbytes' ``LinearNF4``: :class:`Linear4bit` with quant_type "nf4", same signature as bitsandbytes'."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: torch.dtype | None = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device=None, *, blocksize: int = 64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device, blocksize=blocksize)
