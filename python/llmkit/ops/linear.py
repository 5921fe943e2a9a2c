"""The decode-time GEMV: ``torch.ops.llmkit.linear_gemv`` (CPU).

``x @ weight.T + bias`` for at most 8 rows of x (one token per sequence in a
decode step), float32, weight in nn.Linear's (out, in) layout. The kernel
(csrc/linear/) splits the output rows across threads and reaches about twice
the weight-read bandwidth of MKL's single-threaded GEMV for this shape.
:func:`decode_linear` picks it where it applies and F.linear elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_same_device, check_tensor

MAX_GEMV_ROWS = 8


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., in) of at most 8 rows; CPU, float32,
    weight contiguous. in_features 0 gives F.linear's bias (or zeros); NaN and
    inf propagate as in F.linear. Not differentiable (inference)."""
    check_tensor("x", x)
    check_tensor("weight", weight, x, "x")
    if bias is not None:
        check_tensor("bias", bias, x, "x")
    return torch.ops.llmkit.linear_gemv(x, weight, bias)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_gemv where it applies (CPU, float32, <= 8 rows, contiguous weight), else F.linear."""
    if (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.dim() >= 1 and weight.is_contiguous() and math.prod(x.shape[:-1]) <= MAX_GEMV_ROWS
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))):
        return torch.ops.llmkit.linear_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.register_fake("llmkit::linear_gemv")
def _linear_gemv_fake(x, weight, bias):
    check_same_device("linear_gemv", ("x", x), ("weight", weight), ("bias", bias))
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
