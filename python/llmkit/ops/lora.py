"""Fused LoRA: ``y = base(x) + scaling * dropout(x) @ A.T @ B.T`` in one op.

Wrapper of ``torch.ops.llmkit.lora_linear`` (csrc/lora/), its hand-derived
backward (``lora_linear_backward``) and fake kernels. PEFT's LoRA layer
(``lora_B(lora_A(dropout(x))) * scaling`` added to the base layer's output)
as one op over a dense or an NF4 frozen base, which saves only x and a
dropout seed for the backward (PEFT's autograd keeps the dropped input and
``x A^T``, and the mask), accumulates the LoRA product into the base output
inside the GEMM, and never forms a gradient for the frozen weight.
"""

from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor
from .quant import nf4_op_args

_SEED_RANGE = 2**62


def seed_tensor(seed) -> torch.Tensor:
    """The op's seed argument: an int64 scalar on the CPU. Any Python int is
    taken modulo 2**64 (the mask hash's arithmetic), as two's complement."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed must be an int or a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(()).cpu()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.tensor((seed + 2**63) % 2**64 - 2**63, dtype=torch.int64)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout whose mask is a pure function of ``(seed, flat index)``
    (csrc/lora/lora.h; :func:`llmkit.ops.reference.lora_dropout_keep` gives it):
    ``x * keep / (1 - p)``. Not differentiable on its own: lora_linear uses it."""
    check_tensor("x", x)
    return torch.ops.llmkit.lora_dropout(x, float(p), int(seed_tensor(seed)))


def _base_args(base) -> list:
    """``weight, packed, absmax, blocksize, shape, nested_absmax, nested_code,
    offset, nested_blocksize`` for a dense weight or a ``(packed, state)`` pair."""
    if isinstance(base, torch.Tensor):
        check_tensor("weight", base)
        return [base, None, None, 64, [], None, None, None, 256]
    if isinstance(base, (tuple, list)) and len(base) == 2:
        return [None, *nf4_op_args(base[0], base[1])]
    raise TypeError("base must be a dense weight tensor or a (packed, NF4State) pair, "
                    f"got {type(base).__name__}")


def lora_linear(x: torch.Tensor, base, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, dropout_p: float = 0.0, *, training: bool = True,
                seed: int | None = None) -> torch.Tensor:
    """``base(x) + scaling * dropout(x) @ lora_A.T @ lora_B.T`` in one op (PEFT's LoRA forward).

    Args:
        x: (..., in_features), float32/float16/bfloat16.
        base: the frozen base weight: a dense (out_features, in_features)
            tensor of x's dtype, or an NF4 ``(packed, state)`` pair.
        bias: (out_features,) or None; may require grad.
        lora_A: (r, in_features); lora_B: (out_features, r). Cast to x's
            dtype inside (fp32 adapters over a bf16 base, as PEFT keeps them).
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout on the LoRA input, active when ``training``.
        seed: the dropout mask's seed; None draws one from torch's default
            generator (so ``torch.manual_seed`` makes runs repeatable).

    Gradients flow to x, lora_A, lora_B and bias, never to the base weight
    (which must not require grad).
    """
    check_tensor("x", x)
    args = _base_args(base)
    check_same_device("lora_linear", ("x", x), ("the base weight", args[0] if args[0] is not None else args[1]))
    if args[0] is not None and args[0].requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_linear: the base weight must be frozen (requires_grad=False); "
                         "LoRA trains lora_A and lora_B only")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_tensor(name, t, x)
    if bias is not None:
        check_tensor("bias", bias, x)
        bias = bias.to(x.dtype)
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is None:
        # Drawn as a tensor, not a Python int: under torch.compile the draw is
        # part of the graph, so every call gets a fresh mask.
        seed = torch.randint(0, _SEED_RANGE, (), dtype=torch.int64) if p > 0.0 else torch.zeros((), dtype=torch.int64)
    return torch.ops.llmkit.lora_linear(x, *args, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), float(scaling), p,
                                        seed_tensor(seed))


def _setup(ctx, inputs, output):
    (x, weight, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias,
     lora_A, lora_B, scaling, dropout_p, seed) = inputs
    # x, the adapters and the (frozen) base by reference: no activation but x is kept.
    ctx.save_for_backward(x, weight, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed)
    ctx.args = (blocksize, shape, nested_blocksize, scaling, dropout_p)
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad_out):
    x, weight, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed = ctx.saved_tensors
    blocksize, shape, nested_blocksize, scaling, dropout_p = ctx.args
    grad_x, grad_A, grad_B = torch.ops.llmkit.lora_linear_backward(
        grad_out.contiguous(), x, weight, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset,
        nested_blocksize, lora_A, lora_B, scaling, dropout_p, seed, ctx.needs_input_grad[0])
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.bias_needs_grad else None
    return (grad_x if ctx.needs_input_grad[0] else None, None, None, None, None, None, None, None, None, None,
            grad_bias, grad_A, grad_B, None, None, None)


torch.library.register_autograd("llmkit::lora_linear", _backward, setup_context=_setup)


@torch.library.register_fake("llmkit::lora_dropout")
def _lora_dropout_fake(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _same_device_as_x(op, x, **tensors):
    # `seed` is not checked: it is a CPU scalar whatever x's device.
    check_same_device(op, ("x", x), *tensors.items())


@torch.library.register_fake("llmkit::lora_linear")
def _lora_linear_fake(x, weight, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset,
                      nested_blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _same_device_as_x("lora_linear", x, weight=weight, packed=packed, absmax=absmax, nested_absmax=nested_absmax,
                      nested_code=nested_code, offset=offset, bias=bias, lora_A=lora_A, lora_B=lora_B)
    return x.new_empty((*x.shape[:-1], lora_B.shape[0]))


@torch.library.register_fake("llmkit::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, x, weight, packed, absmax, blocksize, shape, nested_absmax, nested_code,
                               offset, nested_blocksize, lora_A, lora_B, scaling, dropout_p, seed, compute_grad_x):
    _same_device_as_x("lora_linear_backward", x, grad_out=grad_out, weight=weight, packed=packed, absmax=absmax,
                      nested_absmax=nested_absmax, nested_code=nested_code, offset=offset, lora_A=lora_A,
                      lora_B=lora_B)
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)
