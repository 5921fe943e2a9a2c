"""``torch.nn.functional.scaled_dot_product_attention`` on llmkit's flash kernel.

:func:`sdpa` takes torch's layout (..., heads, seqlen, head_dim) and
semantics, transposes to flash-attn's (batch, seqlen, heads, head_dim) and
calls :func:`llmkit.ops.flash_attention`. What the kernel cannot express
(dropout, an arbitrary dense mask, an unsupported head_dim / dtype / device,
heads that only broadcast) goes to torch's own SDPA, with one warning per
reason, so a call always returns torch's result.

Two convention differences are handled here:

* torch's ``is_causal`` is TOP-LEFT aligned (query i sees keys j <= i), the
  kernel's causal is bottom-right aligned. For sq < sk the keys past sq are
  never seen, so they are cropped; for sq > sk top-left causal is the window
  ``(-1, sq - sk)``.
* A boolean mask (or a float mask of only 0 / -inf) that is "contiguous
  padding" times a causal or full pattern runs on
  :func:`llmkit.ops.flash_attention_varlen` after unpadding; other masks fall
  back. A query that sees no key gets 0, as in torch >= 2.5.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .. import _C
from ..ops.attention import flash_attention, flash_attention_varlen

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

_warned_fallback_reasons: set[str] = set()


def warn_fallback_once(reason: str, fallback: str = "torch.nn.functional.scaled_dot_product_attention") -> None:
    """Warn, once per distinct `reason`, that llmkit attention falls back to `fallback`."""
    if reason in _warned_fallback_reasons:
        return
    _warned_fallback_reasons.add(reason)
    warnings.warn(f"llmkit attention falls back to {fallback}: {reason}", stacklevel=3)


def kernel_unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why llmkit's flash kernel cannot take these q/k/v (any layout), or None if it can."""
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return f"query/key/value head_dims differ ({head_dim}, {key.shape[-1]}, {value.shape[-1]})"
    if head_dim % 8 or not 0 < head_dim <= _MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not a multiple of 8 in [8, {_MAX_HEAD_DIM}]"
    if query.dtype not in _KERNEL_DTYPES or not query.dtype == key.dtype == value.dtype:
        return f"dtype {query.dtype}/{key.dtype}/{value.dtype} (the kernel takes one of float32, float16, bfloat16)"
    device = query.device
    if device.type not in ("cpu", "cuda") or key.device != device or value.device != device:
        return f"device {device.type} (the kernel runs on cpu and cuda)"
    if device.type == "cuda" and not _C.built_with_cuda():
        return "CUDA tensors but this llmkit build has no CUDA kernels"
    return None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------ masks -> varlen ----

def _contiguous_runs(valid: torch.Tensor):
    """(start, length) of each row's True run, or None if a row's Trues are not one run."""
    length = valid.sum(dim=1)
    start = valid.int().argmax(dim=1)  # first True (0 for an empty row)
    idx = torch.arange(valid.shape[1], device=valid.device)
    run = (idx >= start[:, None]) & (idx < (start + length)[:, None])
    return (start, length) if torch.equal(run, valid) else None


def plan_padded_varlen(mask: torch.Tensor, windows, queries_follow_keys: bool = False):
    """Express a boolean mask as unpadding + a window pattern, if it is one.

    `mask` (batch, sq, sk) is True where a query sees a key. It matches when,
    in each batch row, the keys anyone sees form one contiguous run, the
    queries that see something form one contiguous run, and within those runs
    the mask is one of `windows` ((left, right), flash-attn convention,
    bottom-right aligned on the runs' lengths). With `queries_follow_keys`
    (self-attention over padded tokens, sq == sk) the queries kept are the
    key run: padded query rows then get 0 instead of what the mask gives
    them - harmless when nothing reads padded positions.

    Returns ``(q_valid, k_valid, window)`` (bool (batch, sq), (batch, sk)) or
    None. Costs a few O(batch * sq * sk) comparisons and host syncs.
    """
    batch, sq, sk = mask.shape
    k_valid = mask.any(dim=1)
    q_valid = k_valid if (queries_follow_keys and sq == sk) else mask.any(dim=2)
    q_runs, k_runs = _contiguous_runs(q_valid), _contiguous_runs(k_valid)
    if q_runs is None or k_runs is None:
        return None
    (q_start, q_len), (k_start, k_len) = q_runs, k_runs
    i = torch.arange(sq, device=mask.device)[None, :, None] - q_start[:, None, None]
    j = torch.arange(sk, device=mask.device)[None, None, :] - k_start[:, None, None]
    diag = i + (k_len - q_len)[:, None, None]
    inside = q_valid[:, :, None] & k_valid[:, None, :]
    wanted = mask & q_valid[:, :, None]
    for left, right in windows:
        implied = inside
        if left >= 0:
            implied = implied & (j >= diag - left)
        if right >= 0:
            implied = implied & (j <= diag + right)
        if torch.equal(implied, wanted):
            return q_valid, k_valid, (left, right)
    return None


def _cu_seqlens(valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    lengths = valid.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(valid.shape[0] + 1, dtype=torch.int32, device=valid.device)
    cu[1:] = torch.cumsum(lengths, dim=0)
    return cu, int(lengths.max()) if lengths.numel() else 0


def padded_flash_attention(q, k, v, q_valid, k_valid, window, softmax_scale=None):
    """flash_attention on padded batches: q (b, sq, hq, d), k/v (b, sk, hk, d);
    only the rows where `q_valid` / `k_valid` are True take part (unpadded to
    varlen, one contiguous run per batch row). Padded query rows get 0."""
    cu_q, max_q = _cu_seqlens(q_valid)
    cu_k, max_k = _cu_seqlens(k_valid)
    out = flash_attention_varlen(q[q_valid], k[k_valid], v[k_valid], cu_q, cu_k, max_q, max_k,
                                 window=window, softmax_scale=softmax_scale)
    return out.new_zeros(q.shape[:-1] + (v.shape[-1],)).index_put((q_valid,), out)


def _as_bool_mask(attn_mask: torch.Tensor) -> torch.Tensor | None:
    """A boolean "may attend" mask equal to `attn_mask`, or None for a float
    mask with values other than 0 and -inf (a real additive bias)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    if not attn_mask.is_floating_point():
        return None
    allowed = attn_mask == 0
    return allowed if bool((allowed | torch.isneginf(attn_mask)).all()) else None


# ---------------------------------------------------------------- sdpa ----

def top_left_causal_attention(q, k, v, softmax_scale=None):
    """torch's ``is_causal`` (query i sees keys j <= i, whatever sq and sk) on
    the bottom-right-aligned kernel; q (b, sq, hq, d), k/v (b, sk, hk, d)."""
    sq, sk = q.shape[1], k.shape[1]
    if sq <= sk:  # keys past sq are never seen
        return flash_attention(q, k[:, :sq], v[:, :sq], causal=True, softmax_scale=softmax_scale)
    return flash_attention(q, k, v, window=(-1, sq - sk), softmax_scale=softmax_scale)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments, layout (..., heads, seqlen, head_dim) and result, computed
    by llmkit's flash kernel; falls back to torch (warning once per reason)
    for dropout, masks that are not padding + causal/full, and inputs the
    kernel does not take. Differentiable in query, key and value.
    """
    def fallback(reason: str) -> torch.Tensor:
        warn_fallback_once(reason)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    if dropout_p > 0.0:
        return fallback("dropout_p > 0 (the kernel has no dropout)")
    if attn_mask is not None and is_causal:
        return fallback("attn_mask together with is_causal")  # torch raises the error
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return fallback("inputs of fewer than 2 dims")
    reason = kernel_unsupported_reason(query, key, value)
    if reason is not None:
        return fallback(reason)

    # Normalise to (n, heads, seqlen, head_dim); leading dims broadcast like torch's.
    q, k, v = (t.reshape((1,) * max(0, 3 - t.dim()) + t.shape) for t in (query, key, value))
    try:
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        return fallback("leading dims that do not broadcast")
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    if v.shape[-3] != heads_kv or k.shape[-2] != v.shape[-2]:
        return fallback("key and value shapes differ")
    if heads_q != heads_kv and not (heads_q % heads_kv == 0 and (enable_gqa or heads_kv == 1)):
        return fallback(f"{heads_q} query heads with {heads_kv} key/value heads"
                        + ("" if enable_gqa else " without enable_gqa"))
    sq, sk = q.shape[-2], k.shape[-2]
    n = math.prod(lead)
    q, k, v = (t.expand(lead + t.shape[-3:]).reshape(n, *t.shape[-3:]).transpose(1, 2) for t in (q, k, v))
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))

    if attn_mask is not None:
        mask = _as_bool_mask(attn_mask)
        if mask is None:
            return fallback("a float attn_mask with values other than 0 and -inf (an additive bias)")
        mask = mask.reshape((1,) * max(0, len(lead) + 3 - mask.dim()) + mask.shape)
        if mask.shape[-3] != 1:
            return fallback("a per-head attn_mask")
        try:
            mask = mask.expand(lead + (1, sq, sk)).reshape(n, sq, sk)
        except RuntimeError:
            return fallback("an attn_mask that does not broadcast")  # torch raises the error
        plan = plan_padded_varlen(mask, windows=((-1, -1), (-1, 0)))
        if plan is None:
            return fallback("an attn_mask that is not contiguous padding with a full or causal pattern")
        q_valid, k_valid, window = plan
        out = padded_flash_attention(q, k, v, q_valid, k_valid, window, softmax_scale=scale)
    elif is_causal:
        out = top_left_causal_attention(q, k, v, softmax_scale=scale)
    else:
        out = flash_attention(q, k, v, softmax_scale=scale)
    out_shape = lead + (heads_q, sq, v.shape[-1])
    if max(query.dim(), key.dim(), value.dim()) == 2:
        out_shape = (sq, v.shape[-1])  # torch keeps (seqlen, head_dim) inputs unbatched
    return out.transpose(1, 2).reshape(out_shape)
