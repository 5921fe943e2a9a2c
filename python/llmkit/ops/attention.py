"""Flash attention with sliding windows and Longformer global tokens.

Wrappers of ``torch.ops.llmkit.flash_attention_forward`` / ``_backward``
(kernels in csrc/attention/), their autograd formula and fake kernels. The
API follows flash-attn 2 (``flash_attn_func`` / ``flash_attn_varlen_func``):
layout (batch, seqlen, heads, head_dim), GQA/MQA when the query heads divide
by the key/value heads, causal masks bottom-right aligned, windows
``(left, right)`` with -1 unbounded. Everything after ``v`` (after
``max_seqlen_k`` for varlen) is keyword-only, so a call written for
flash-attn's positional order (``dropout_p`` fourth) fails loudly instead of
being read as ``causal``; flash-attn's own spellings (``window_size``,
``dropout_p=0.0``, ``softcap=0.0``, ``alibi_slopes``) are accepted, and
:mod:`llmkit.ops.flash_attn_interface` has flash-attn's exact signatures.

NaN / inf: a non-finite q, k or attn_bias entry at a visible (query, key)
pair gives that query a NaN output row and lse, as softmax does (SDPA's
math path, the float64 reference); masked pairs never contribute, except
that a non-finite V row of a key that a query cannot see may reach it through
0 * inf inside one block (SDPA and flash-attn share this).
"""

from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = "multiples of 8 up to 256"


def _window(causal: bool, window, window_size=None) -> tuple[int, int]:
    if window is not None and window_size is not None and tuple(window) != tuple(window_size):
        raise ValueError(f"window={window!r} and window_size={window_size!r} disagree; give one "
                         "(window_size is flash-attn's name for the same (left, right) pair)")
    if window is None:
        window = (-1, -1) if window_size is None else window_size
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window sizes must be >= -1 (-1 = unbounded), got {window!r}")
    if causal:
        right = 0  # flash-attn: causal == window (left, 0)
    return left, right


def _scale(q: torch.Tensor, softmax_scale) -> float:
    if softmax_scale is None:
        d = q.shape[-1] if q.dim() else 0
        return d ** -0.5 if d > 0 else 1.0  # head_dim 0: the op rejects it with its own message
    scale = float(softmax_scale)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return scale


def _check_global(global_tokens, causal: bool, q: torch.Tensor):
    if global_tokens is None:
        return None
    check_tensor("global_tokens", global_tokens, q, "q")
    if causal:
        raise ValueError(
            "global_tokens with causal=True is not supported: Longformer global attention is "
            "symmetric (a global token sees every token, future ones included)"
        )
    return global_tokens


def _check_bias(attn_bias, q: torch.Tensor):
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a tensor or None, got {type(attn_bias).__name__}")
    check_tensor("attn_bias", attn_bias, q, "q")
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias must be a floating-point tensor (added to the scores in float32), "
                        f"got {attn_bias.dtype}; for a boolean mask use bias.masked_fill(~mask, -inf)")
    return attn_bias


def _check_unsupported(dropout_p, softcap) -> None:
    """flash-attn's dropout_p and softcap: accepted at their defaults (off)."""
    p = float(dropout_p)
    if p < 0 or p != p:
        raise ValueError(f"dropout_p must be >= 0, got {dropout_p!r}")
    if p > 0:
        raise NotImplementedError(f"dropout_p={dropout_p!r}: llmkit's attention kernels have no attention dropout "
                                  "(use dropout_p=0.0, flash-attn's inference setting, or dropout on the output)")
    if float(softcap) > 0:  # flash-attn: softcap <= 0 means off
        raise NotImplementedError(f"softcap={softcap!r}: llmkit's attention kernels have no logit softcapping "
                                  "(use softcap=0.0)")


def alibi_bias(alibi_slopes: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
               window: tuple[int, int]) -> torch.Tensor:
    """flash-attn's ALiBi as an additive float32 bias (batch or 1, heads, seqlen_q, seqlen_k).

    ``alibi_slopes`` (heads,) or (batch, heads). As flash-attn's kernels:
    ``-slope * |i + seqlen_k - seqlen_q - j|``, except with a causal window
    (left unbounded, right 0) where it is ``slope * j`` -- the same softmax
    (a constant per row), and so the same lse as flash-attn's.
    """
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a float tensor (heads,) or (batch, heads), got {alibi_slopes!r}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    slopes = alibi_slopes.detach().float().reshape(-1, heads, 1, 1)
    left, right = window
    # flash-attn treats a window side that covers every key as unbounded.
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    j = torch.arange(seqlen_k, device=slopes.device, dtype=torch.float32)
    if left < 0 and right == 0:
        return (slopes * j).expand(-1, -1, seqlen_q, -1)
    i = torch.arange(seqlen_q, device=slopes.device, dtype=torch.float32)[:, None]
    return -slopes * (i + (seqlen_k - seqlen_q) - j).abs()


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    window: tuple[int, int] | None = None, softmax_scale: float | None = None,
                    global_tokens: torch.Tensor | None = None, return_lse: bool = False,
                    deterministic: bool = False, attn_bias: torch.Tensor | None = None,
                    window_size: tuple[int, int] | None = None, dropout_p: float = 0.0, softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None):
    """Exact attention, computed blockwise without the (seqlen_q, seqlen_k) matrix.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim), float32 / float16 / bfloat16.
        k, v: (batch, seqlen_k, heads_kv, head_dim); heads_q divisible by
            heads_kv (GQA / MQA). head_dim a multiple of 8, at most 256.
        causal: mask keys after the query, aligned to the bottom-right corner
            when seqlen_q != seqlen_k (flash-attn >= 2.1). Keyword-only, like
            every argument after v.
        window: (left, right): query i sees keys
            ``[i + sk - sq - left, i + sk - sq + right]``; -1 = unbounded
            (default (-1, -1)). Time and memory are O(seqlen * window).
            ``window_size=`` (flash-attn's name) is the same argument.
        softmax_scale: defaults to head_dim ** -0.5.
        global_tokens: bool (batch, seqlen): Longformer global attention
            (needs seqlen_q == seqlen_k; not with causal).
        return_lse: also return the logsumexp of the scaled scores,
            float32 (batch, heads_q, seqlen_q); -inf for a query with no key.
        deterministic: accepted for flash-attn compatibility; every llmkit
            backward is deterministic (no atomics).
        attn_bias: optional float tensor (batch or 1, heads_q or 1, seqlen_q,
            seqlen_k), any float dtype (used in float32), added to the scaled
            scores: ``softmax(scale * q k^T + attn_bias)``, the causal /
            window / global masks applied on top. -inf entries hide keys
            (T5's relative position bias, ALiBi, padding masks). CPU only for
            now; its gradient is that of the pre-softmax scores, summed over
            the broadcast dimensions (memory: one float32 (batch, heads_q,
            seqlen_q, seqlen_k) buffer in the backward when it needs a grad).
        dropout_p, softcap: flash-attn's; only their off values (0.0) are
            supported (NotImplementedError otherwise).
        alibi_slopes: flash-attn's ALiBi, float (heads_q,) or (batch,
            heads_q): see :func:`alibi_bias`; runs as an attn_bias (CPU).

    Returns:
        out (like q), or ``(out, lse)``. A query with no visible key gets 0.
        Differentiable in q, k, v and attn_bias (backward recomputes from lse).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, q, "q")
    left, right = _window(causal, window, window_size)
    scale = _scale(q, softmax_scale)
    _check_unsupported(dropout_p, softcap)
    global_tokens = _check_global(global_tokens, causal, q)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(q.shape)}"
                         " (for packed sequences use flash_attention_varlen)")
    attn_bias = _check_bias(attn_bias, q)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, q, "q")
        if q.device.type != "cpu":
            raise NotImplementedError("alibi_slopes: llmkit runs ALiBi as an attn_bias, which has no CUDA kernel "
                                      "yet (CPU only)")
        sk = k.shape[1] if k.dim() == 4 else 0
        bias = alibi_bias(alibi_slopes, q.shape[0], q.shape[2], q.shape[1], sk, (left, right))
        attn_bias = bias if attn_bias is None else attn_bias + bias
    out, lse = torch.ops.llmkit.flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1] if k.dim() == 4 else 0,
        scale, left, right, global_tokens, attn_bias)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           window: tuple[int, int] | None = None, softmax_scale: float | None = None,
                           global_tokens: torch.Tensor | None = None, return_lse: bool = False,
                           deterministic: bool = False, attn_bias=None,
                           window_size: tuple[int, int] | None = None, dropout_p: float = 0.0,
                           softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None):
    """Attention over packed variable-length sequences (flash_attn_varlen_func).

    q (total_q, heads_q, head_dim) and k/v (total_k, heads_kv, head_dim) hold
    the sequences back to back; sequence b is rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q (int32, batch + 1 offsets
    starting at 0, on q's device; empty sequences allowed). ``max_seqlen_*``
    must be at least the longest sequence. ``global_tokens`` is bool
    (total_q,) and needs cu_seqlens_q == cu_seqlens_k. lse is (heads_q,
    total_q). Everything else as :func:`flash_attention` (keyword-only after
    max_seqlen_k); ``attn_bias`` and ``alibi_slopes`` are not supported here
    (ValueError / NotImplementedError).
    """
    if attn_bias is not None:
        raise ValueError("flash_attention_varlen: attn_bias is not supported for packed sequences "
                         "(pad them and use flash_attention with attn_bias)")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: not supported for packed sequences (llmkit runs ALiBi as an "
                                  "attn_bias); pad them and use flash_attn_func / flash_attention")
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t, q, "q")
    left, right = _window(causal, window, window_size)
    scale = _scale(q, softmax_scale)
    _check_unsupported(dropout_p, softcap)
    global_tokens = _check_global(global_tokens, causal, q)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (total_q, heads, head_dim) for varlen, got shape {tuple(q.shape)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    out, lse = torch.ops.llmkit.flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, left, right, global_tokens)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------- autograd ----

_BIAS_INPUT = 11  # attn_bias's position among the forward op's inputs


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, global_tokens, attn_bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, global_tokens, attn_bias)
    ctx.args = (max_q, max_k, scale, left, right)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, global_tokens, attn_bias = ctx.saved_tensors
    max_q, max_k, scale, left, right = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The dispatcher drops trailing arguments equal to their default (attn_bias=None).
    needs = ctx.needs_input_grad
    bias_grad = attn_bias is not None and len(needs) > _BIAS_INPUT and needs[_BIAS_INPUT]
    dq, dk, dv, dbias = torch.ops.llmkit.flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right,
        global_tokens, True, attn_bias, bias_grad)
    return dq, dk, dv, None, None, None, None, None, None, None, None, dbias if bias_grad else None


torch.library.register_autograd("llmkit::flash_attention_forward", _backward, setup_context=_setup_context)


# ------------------------------------------------------- fake kernels ----

@torch.library.register_fake("llmkit::flash_attention_forward")
def _forward_fake(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, global_tokens, attn_bias=None):
    check_same_device("flash_attention_forward", ("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_q),
                      ("cu_seqlens_k", cu_k), ("global_tokens", global_tokens), ("attn_bias", attn_bias))
    out = q.new_empty(q.shape).contiguous()
    if q.dim() == 4:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("llmkit::flash_attention_backward")
def _backward_fake(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right,
                   global_tokens, deterministic, attn_bias=None, bias_requires_grad=False):
    check_same_device("flash_attention_backward", ("q", q), ("dout", dout), ("k", k), ("v", v), ("out", out),
                      ("lse", lse), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("global_tokens", global_tokens),
                      ("attn_bias", attn_bias))
    if attn_bias is not None and bias_requires_grad:
        dbias = attn_bias.new_empty(attn_bias.shape).contiguous()
    else:
        dbias = q.new_empty((0,), dtype=torch.float32)
    return (q.new_empty(q.shape).contiguous(), k.new_empty(k.shape).contiguous(),
            v.new_empty(v.shape).contiguous(), dbias)
