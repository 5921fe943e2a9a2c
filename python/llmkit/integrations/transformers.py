"""llmkit's flash kernel as a Hugging Face transformers attention implementation.

Usage::

    import transformers
    import llmkit                      # registers "llmkit" when transformers is already imported
    from llmkit.integrations import transformers as llmkit_hf
    llmkit_hf.register()               # explicit; idempotent (importing this module also registers)

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="llmkit")
    model.set_attn_implementation("llmkit")   # or switch a loaded model

``register()`` adds ``"llmkit"`` to transformers' ``AttentionInterface``
(the attention function) and to ``AttentionMaskInterface`` with
transformers' own SDPA mask builder, so models hand us exactly what they hand
``attn_implementation="sdpa"``: no mask (None) when the pattern is plain
causal / full, else a boolean (batch, 1, q_len, kv_len) mask.

What :func:`llmkit_attention_forward` does with each mask:

* None: the kernel, causal when the layer is causal and q_len > 1 (decode
  steps attend to the whole cache), exactly as transformers' SDPA path.
* boolean mask that is padding (one contiguous run of real tokens per row,
  left or right padded) times a causal / sliding-window / full pattern:
  unpadded to :func:`llmkit.ops.flash_attention_varlen`. In causal layers
  padded query rows get 0 where SDPA gives them some value: nothing
  downstream reads them (they are masked as keys), but logits at padded
  positions differ. Bidirectional layers match SDPA on every row.
  Checking the mask costs a few O(batch * q_len * kv_len) comparisons and
  host syncs per layer (not torch.compile friendly).
* anything else (packed sequences, custom or per-head masks, float bias,
  dropout, position_bias / softcap / sinks, head_dim the kernel does not
  take): transformers' SDPA attention function, with one warning per reason.
"""

from __future__ import annotations

import torch

from ..nn.functional import (kernel_unsupported_reason, padded_flash_attention, plan_padded_varlen,
                             top_left_causal_attention, warn_fallback_once)
from ..ops.attention import flash_attention

ATTN_IMPLEMENTATION = "llmkit"

# kwargs that change the attention math beyond what the kernel computes.
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")


def _windows_to_try(is_causal: bool, sliding_window: int | None) -> list[tuple[int, int]]:
    """Flash-attn windows the layer's mask may be, most specific first.

    transformers' causal sliding window W keeps keys with q_idx - kv_idx < W
    (left = W - 1); its bidirectional one |q_idx - kv_idx| <= W (models differ
    in what they pass as W, so W - 1 is tried too). A sliding layer's mask is
    the plain one while the sequence is shorter than W, hence the last
    candidate. plan_padded_varlen checks each against the actual mask."""
    windows = []
    if sliding_window is not None and sliding_window > 0:
        w = sliding_window
        windows += [(w - 1, 0)] if is_causal else [(w, w), (w - 1, w - 1)]
    windows.append((-1, 0) if is_causal else (-1, -1))
    return windows


def _sdpa_fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    warn_fallback_once(reason, fallback="transformers' sdpa attention")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


_kernel_calls = 0


def kernel_calls() -> int:
    """How many attention calls ran on llmkit's kernel so far (fallbacks not
    counted): a cheap way to see that a model really uses it."""
    return _kernel_calls


def _on_kernel(result):
    global _kernel_calls
    _kernel_calls += 1
    return result, None


def llmkit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (batch, heads, q_len, head_dim), k/v
    (batch, kv_heads, kv_len, head_dim) -> ((batch, q_len, heads, head_dim), None)."""

    def fallback(reason: str):
        return _sdpa_fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                              sliding_window=sliding_window, **kwargs)

    if dropout > 0.0:
        return fallback("attention dropout > 0 (the kernel has no dropout; call model.eval() or set it to 0)")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return fallback(f"{name} (not computed by the kernel)")
    reason = kernel_unsupported_reason(query, key, value)
    if reason is not None:
        return fallback(reason)
    heads_q, heads_kv = query.shape[1], key.shape[1]
    if heads_q % heads_kv:
        return fallback(f"{heads_q} query heads with {heads_kv} key/value heads")

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash layout, last dim stays contiguous
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    if attention_mask is None:
        # transformers' SDPA semantics: causal only with several queries, top-left aligned (a
        # kv longer than q without a mask is an empty static cache, whose tail is unused).
        if causal and q_len > 1:
            return _on_kernel(top_left_causal_attention(q, k, v, softmax_scale=scaling))
        return _on_kernel(flash_attention(q, k, v, softmax_scale=scaling))

    if (attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[-2:] != (q_len, kv_len)):
        return fallback("an attention_mask that is not boolean (batch, 1, q_len, kv_len)")
    mask = attention_mask[:, 0].expand(query.shape[0], q_len, kv_len)
    # Causal layers are self-attention: a padded token is padded as query and as key, so
    # right-padded rows map too. (Not for cross-attention, whose queries are other tokens.)
    plan = plan_padded_varlen(mask, _windows_to_try(causal, sliding_window), queries_follow_keys=causal)
    if plan is None:
        return fallback("an attention_mask that is not padding with a causal / sliding / full pattern")
    q_valid, k_valid, window = plan
    return _on_kernel(padded_flash_attention(q, k, v, q_valid, k_valid, window, softmax_scale=scaling))


def register() -> None:
    """Register ``attn_implementation="llmkit"`` with transformers (idempotent).

    Without transformers installed: an ImportError naming the extra that installs it."""
    from ..utils import require

    require("transformers", "hf", 'attn_implementation="llmkit"')
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, llmkit_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()
