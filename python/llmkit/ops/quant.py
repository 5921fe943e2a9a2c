"""NF4 4-bit quantization ops (QLoRA), byte-compatible with bitsandbytes.

Thin wrappers of ``torch.ops.llmkit.quantize_nf4`` / ``dequantize_nf4`` /
``quantize_blockwise_8bit`` (C++ and CUDA kernels in csrc/quant/), plus their
fake kernels so they trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor
from .quant_state import NestedState, NF4State, cached_dynamic_map

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256  # bitsandbytes' double-quant block


def _check_tensor(name: str, t, device_of: torch.Tensor | None = None) -> None:
    check_tensor(name, t, device_of, device_of_name="the packed tensor")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False, quant_type: str = "nf4",
                 quant_storage: torch.dtype = torch.uint8, *,
                 double_quant: bool | None = None) -> tuple[torch.Tensor, NF4State]:
    """Quantize `w` to NF4 in blocks of `blocksize` elements (QLoRA).

    The keywords are bitsandbytes' ``quantize_4bit`` ones, so its call sites
    (``quantize_4bit(w, blocksize=64, compress_statistics=True,
    quant_type="nf4")``) run unchanged with ``quantize_nf4`` in its place.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape (flattened in
            row-major order; a last partial block is allowed; not empty).
        blocksize: power of two in [32, 4096]; 64 is QLoRA's.
        compress_statistics: also quantize the per-block absmax to 8 bits
            (blocks of 256, offset = mean), QLoRA's double quantization:
            0.127 instead of 0.5 bits of state per parameter.
        quant_type: "nf4" (the only format llmkit implements; "fp4" raises
            NotImplementedError).
        quant_storage: torch.uint8 (bitsandbytes' other storage dtypes raise
            NotImplementedError).
        double_quant: llmkit's older name for compress_statistics (keyword).

    NaN and inf are kept as bitsandbytes keeps them: a block holding a NaN
    gets absmax NaN (it dequantizes to NaN), one holding +-inf absmax inf
    (the infinities dequantize to +inf, the block's finite values to NaN).

    Returns:
        ``(packed, state)``: packed is uint8 of shape ``((n+1)//2, 1)``, two
        codes a byte, the first element in the high nibble; state an
        :class:`NF4State`. Equal, byte for byte, to
        ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
        quant_type="nf4", compress_statistics=compress_statistics)``.
    """
    _check_tensor("w", w)
    if not isinstance(blocksize, int) or isinstance(blocksize, bool):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if double_quant is not None:
        if compress_statistics and not double_quant:
            raise ValueError("compress_statistics=True and double_quant=False disagree; double_quant is "
                             "llmkit's name for compress_statistics: give one")
        compress_statistics = double_quant
    check_quant_type(quant_type, quant_storage)
    packed, absmax = torch.ops.llmkit.quantize_nf4(w, blocksize)
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if compress_statistics:
        offset = absmax.mean()
        code = cached_dynamic_map(w.device)
        qabsmax, absmax2 = torch.ops.llmkit.quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
        state.absmax = qabsmax
        state.offset = offset
        state.state2 = NestedState(absmax=absmax2, code=code, blocksize=NESTED_BLOCKSIZE)
    return packed, state


def check_quant_type(quant_type, quant_storage) -> None:
    """bitsandbytes' quant_type / quant_storage arguments: NF4 in uint8 is what llmkit implements."""
    if quant_type == "fp4":
        raise NotImplementedError("quant_type='fp4': llmkit implements NF4 only (quant_type='nf4', QLoRA's format)")
    if quant_type != "nf4":
        raise ValueError(f"quant_type must be 'nf4' (or bitsandbytes' 'fp4', not supported), got {quant_type!r}")
    if quant_storage != torch.uint8:
        raise NotImplementedError(f"quant_storage={quant_storage}: llmkit stores NF4 codes as torch.uint8 only")


def dequantize_nf4(
    packed: torch.Tensor, state, out_dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize NF4 `packed` with its `state` back to a tensor of ``state.shape``.

    `state` is an :class:`NF4State` or a bitsandbytes ``QuantState`` (NF4).
    `out_dtype` defaults to the dtype that was quantized. Equal to
    ``bitsandbytes.functional.dequantize_4bit(packed, state)``; double-quantized
    absmax is decoded inside the kernel, never materialised. With `out` (a
    contiguous tensor of ``state.shape``, sharing no memory with `packed` or
    the state: ValueError otherwise), writes there: reusing one buffer
    avoids the page faults of a fresh allocation on every call.
    """
    if not isinstance(state, NF4State):
        if hasattr(state, "quant_type") and hasattr(state, "absmax"):
            state = NF4State.from_bnb(state)
        else:
            raise TypeError(f"state must be an NF4State or a bitsandbytes QuantState, got {type(state).__name__}")
    _check_tensor("packed", packed)
    _check_tensor("state.absmax", state.absmax, packed)
    if state.state2 is not None:
        _check_tensor("state.state2.absmax", state.state2.absmax, packed)
        _check_tensor("state.offset", state.offset, packed)
    if out is not None:
        _check_tensor("out", out, packed)
        if out_dtype is not None and out_dtype != out.dtype:
            raise TypeError(f"out_dtype {out_dtype} disagrees with out.dtype {out.dtype}")
        out_dtype = out.dtype
    dtype = state.dtype if out_dtype is None else out_dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype}")
    args = [packed, state.absmax, state.blocksize, list(state.shape), dtype]
    if state.state2 is not None:
        args += [state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize]
    if out is None:
        return torch.ops.llmkit.dequantize_nf4(*args)
    torch.ops.llmkit.dequantize_nf4_into(*args, out=out)
    return out


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256):
    """bitsandbytes' 8-bit blockwise quantization (``quantize_blockwise``):
    nearest of 256 sorted `code` values (the dynamic map by default) of
    x / absmax(block), ties to the lower code. Returns ``(q, absmax)``."""
    _check_tensor("x", x)
    if code is None:
        code = cached_dynamic_map(x.device)
    else:
        _check_tensor("code", code, x)
        # The kernels' nearest-code search assumes a sorted code (256 values: a cheap check).
        if code.dim() != 1 or code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
            raise ValueError("code must be a sorted 1-D tensor of 256 values (like dynamic_map())")
    return torch.ops.llmkit.quantize_blockwise_8bit(x, code, blocksize)


# ------------------------------------------------------------ fake kernels --
# Shapes only, for torch.compile / meta tensors; the checks stay in C++.


@torch.library.register_fake("llmkit::quantize_nf4")
def _quantize_nf4_fake(input, blocksize):
    n = input.numel()
    packed = input.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = input.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return packed, absmax


def _same_device_as_packed(op, packed, absmax, nested_absmax=None, nested_code=None, offset=None, **others):
    check_same_device(op, ("packed", packed), ("absmax", absmax), ("nested_absmax", nested_absmax),
                      ("nested_code", nested_code), ("offset", offset), *others.items())


@torch.library.register_fake("llmkit::dequantize_nf4")
def _dequantize_nf4_fake(packed, absmax, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
                         offset=None, nested_blocksize=256):
    _same_device_as_packed("dequantize_nf4", packed, absmax, nested_absmax, nested_code, offset)
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("llmkit::dequantize_nf4_into")
def _dequantize_nf4_into_fake(packed, absmax, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
                              offset=None, nested_blocksize=256, *, out):
    _same_device_as_packed("dequantize_nf4", packed, absmax, nested_absmax, nested_code, offset, out=out)
    return None


@torch.library.register_fake("llmkit::quantize_blockwise_8bit")
def _quantize_blockwise_8bit_fake(input, code, blocksize):
    check_same_device("quantize_blockwise_8bit", ("input", input), ("code", code))
    n = input.numel()
    return input.new_empty(input.shape, dtype=torch.uint8), input.new_empty(
        ((n + blocksize - 1) // blocksize,), dtype=torch.float32
    )


# ---------------------------------------------------------- fused matmul --


def as_nf4_state(state) -> NF4State:
    """An :class:`NF4State` from ours or a bitsandbytes ``QuantState`` (NF4)."""
    if isinstance(state, NF4State):
        return state
    if hasattr(state, "quant_type") and hasattr(state, "absmax"):
        return NF4State.from_bnb(state)
    raise TypeError(f"state must be an NF4State or a bitsandbytes QuantState, got {type(state).__name__}")


def nf4_op_args(packed: torch.Tensor, state) -> list:
    """The NF4 weight arguments of the fused ops (``packed, absmax, blocksize,
    shape, nested_absmax, nested_code, offset, nested_blocksize``), checked."""
    state = as_nf4_state(state)
    _check_tensor("packed", packed)
    _check_tensor("state.absmax", state.absmax, packed)
    if state.state2 is not None:
        _check_tensor("state.state2.absmax", state.state2.absmax, packed)
        _check_tensor("state.offset", state.offset, packed)
    if len(state.shape) != 2:
        raise ValueError("an NF4 linear weight must be 2-D (out_features, in_features), "
                         f"the state says {tuple(state.shape)}")
    if state.state2 is None:
        return [packed, state.absmax, state.blocksize, list(state.shape), None, None, None, NESTED_BLOCKSIZE]
    s2 = state.state2
    return [packed, state.absmax, state.blocksize, list(state.shape), s2.absmax, s2.code, state.offset, s2.blocksize]


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize_nf4(packed, state).T + bias`` without materialising the weight.

    The QLoRA frozen-base product (bitsandbytes' ``matmul_4bit``): `packed`
    and `state` hold an NF4 weight of shape (out_features, in_features); x is
    (..., in_features) in float32/float16/bfloat16; the result has x's dtype,
    accumulated in float32. Few rows (decoding) take a GEMV that decodes the
    4-bit codes in registers; many rows dequantize cache-sized tiles into a
    GEMM. Differentiable with respect to x (the gradient flows through the
    frozen weight, as QLoRA needs) and bias; never with respect to the weight.
    """
    args = nf4_op_args(packed, state)
    _check_tensor("x", x, packed)
    if bias is not None:
        _check_tensor("bias", bias, packed)
    return torch.ops.llmkit.nf4_linear(x, *args, bias)


def _nf4_linear_setup(ctx, inputs, output):
    x, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.args = (blocksize, shape, nested_blocksize)
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _nf4_linear_backward(ctx, grad_out):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, shape, nested_blocksize = ctx.args
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.llmkit.nf4_linear_grad_input(
            grad_out, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize)
    if ctx.bias_needs_grad:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("llmkit::nf4_linear", _nf4_linear_backward, setup_context=_nf4_linear_setup)


@torch.library.register_fake("llmkit::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, blocksize, shape, nested_absmax=None, nested_code=None, offset=None,
                     nested_blocksize=256, bias=None):
    _same_device_as_packed("nf4_linear", packed, absmax, nested_absmax, nested_code, offset, x=x, bias=bias)
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("llmkit::nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_out, packed, absmax, blocksize, shape, nested_absmax=None, nested_code=None,
                                offset=None, nested_blocksize=256):
    _same_device_as_packed("nf4_linear_grad_input", packed, absmax, nested_absmax, nested_code, offset,
                           grad_out=grad_out)
    return grad_out.new_empty((*grad_out.shape[:-1], shape[1]))
