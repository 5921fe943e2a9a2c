"""flash-attn 2's Python entry points on llmkit's kernels, signature for signature.

``from llmkit.ops.flash_attn_interface import flash_attn_func`` in place of
``from flash_attn import flash_attn_func`` runs a flash-attn call site
unchanged, on the CPU too: the same argument names, order and defaults as
flash-attn 2.8's ``flash_attn/flash_attn_interface.py``, the same layouts
(q (batch, seqlen, nheads, headdim), varlen q (total_q, nheads, headdim)
with int32 ``cu_seqlens``), the same bottom-right causal and
``window_size=(left, right)`` conventions, and outputs of q's dtype.

What differs, and why:

* ``dropout_p > 0``, ``softcap > 0`` and ``block_table`` (paged KV) are
  flash-attn features llmkit's kernels do not have: their default values
  are accepted, any other raises NotImplementedError naming the argument.
* ``alibi_slopes`` (nheads,) or (batch, nheads) runs as an additive bias
  (:func:`llmkit.ops.attention.alibi_bias`, flash-attn's formula), so it
  needs the CPU and the fixed-length functions; otherwise NotImplementedError.
* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` like
  flash-attn, where ``S_dmask`` is the placeholder flash-attn itself returns
  without dropout: an empty tensor of q's dtype (flash-attn fills it only
  when dropout_p > 0). softmax_lse is float32 (batch, nheads, seqlen_q), or
  (nheads, total_q) for varlen.
* float32 inputs are accepted (flash-attn takes fp16 / bf16 only).
* ``deterministic`` is accepted and changes nothing: llmkit's backward is
  always deterministic.
* head dims that are not a multiple of 8 are zero-padded to one, as
  flash-attn does (the scale stays head_dim ** -0.5 of the real head_dim).
* negative window sizes mean unbounded, and a window side covering every
  key too, as in flash-attn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import flash_attention, flash_attention_varlen

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]


def _window_size(window_size) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    return max(left, -1), max(right, -1)  # flash-attn: any negative size is unbounded


def _pad_head_dim(q, k, v):
    """(q, k, v, head_dim) with head_dim zero-padded to a multiple of 8, as flash-attn pads:
    zeros add nothing to q . k, and the extra output columns are cut off."""
    d = q.shape[-1]
    if d % 8 == 0 or k.shape[-1] != d or v.shape[-1] != d:
        return q, k, v, d  # nothing to pad, or shapes the op rejects with its own message
    pad = (0, 8 - d % 8)
    return F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), d


def _finish(result, head_dim: int, q: torch.Tensor, return_attn_probs: bool):
    out, lse = result
    out = out[..., :head_dim]
    if not return_attn_probs:
        return out
    # flash-attn's S_dmask without dropout: an empty placeholder of q's dtype.
    return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)


def _check_block_table(block_table) -> None:
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not supported by llmkit's attention kernels; "
                                  "pass the keys and values as contiguous packed tensors")


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_func``: q (batch, seqlen_q, nheads, headdim),
    k / v (batch, seqlen_k, nheads_k, headdim), nheads divisible by nheads_k;
    returns out (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse,
    S_dmask)`` with return_attn_probs (see the module docstring)."""
    qp, kp, vp, d = _pad_head_dim(q, k, v)
    scale = d ** -0.5 if softmax_scale is None and d > 0 else softmax_scale
    result = flash_attention(qp, kp, vp, causal=causal, window=_window_size(window_size), softmax_scale=scale,
                             return_lse=True, deterministic=deterministic, dropout_p=dropout_p, softcap=softcap,
                             alibi_slopes=alibi_slopes)
    return _finish(result, d, q, return_attn_probs)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn's ``flash_attn_varlen_func``: q (total_q, nheads, headdim),
    k / v (total_k, nheads_k, headdim), sequence b in rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int32, batch + 1 entries);
    returns out (total_q, nheads, headdim), or ``(out, softmax_lse, S_dmask)``
    with softmax_lse (nheads, total_q)."""
    _check_block_table(block_table)
    qp, kp, vp, d = _pad_head_dim(q, k, v)
    scale = d ** -0.5 if softmax_scale is None and d > 0 else softmax_scale
    result = flash_attention_varlen(qp, kp, vp, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                    causal=causal, window=_window_size(window_size), softmax_scale=scale,
                                    return_lse=True, deterministic=deterministic, dropout_p=dropout_p,
                                    softcap=softcap, alibi_slopes=alibi_slopes)
    return _finish(result, d, q, return_attn_probs)


def _unpack(packed: torch.Tensor, dim: int, count: int, name: str, layout: str):
    if not isinstance(packed, torch.Tensor) or packed.dim() <= dim or packed.shape[dim] != count:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{name} must be {layout}, got {shape}")
    return packed.unbind(dim)  # views: the gradients flow back into the packed tensor


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # <=0.0 means deactivate
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, nheads, headdim)."""
    q, k, v = _unpack(qkv, 2, 3, "qkv", "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_kvpacked_func``: q (batch, seqlen_q, nheads, headdim),
    kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, 2, 2, "kv", "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, nheads, headdim)."""
    q, k, v = _unpack(qkv, 1, 3, "qkv", "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, nheads, headdim),
    kv (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, 1, 2, "kv", "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
