"""Longformer: RoBERTa with sliding-window attention plus global tokens.

Longformer (Beltagy et al., 2020) replaces RoBERTa's full self-attention with
a window of ``attention_window / 2`` tokens on each side, O(n * w) in time
and memory, plus *global* tokens (``global_attention_mask``: [CLS], question
tokens, ...) that attend to every token and that every token attends to.
Everything else is RoBERTa (:mod:`llmkit.models.bert` with model_type
"longformer"), so this file only holds the attention layer, the config and
the RoBERTa -> Longformer conversion.

Global tokens have their own projections in Longformer (``query_global``,
``key_global``, ``value_global``). As in transformers, a local token sees
its window and the global tokens through the *local* projections, and a
global token's output is recomputed with the *global* projections over all
tokens. Here that is two calls of llmkit's attention op: one windowed call
with ``global_tokens`` for every row, then one full-attention call for the
global rows only, whose results replace those rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.attention import flash_attention_varlen
from .bert import BERT, BertConfig, BertForMaskedLM, PackedBatch, SelfAttention, _HFModel
from .hf_io import load_hf_checkpoint

__all__ = ["LongformerConfig", "Longformer", "LongformerForMaskedLM"]


@dataclass
class LongformerConfig(BertConfig):
    # RoBERTa's vocabulary and special ids, 4096 positions (+ RoBERTa's offset of 2).
    vocab_size: int = 50265
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    model_type: str = "longformer"
    # Full window width per layer (an int for all layers): a token sees
    # attention_window // 2 tokens on each side. Even, as in transformers.
    attention_window: int | list[int] = 512

    def __post_init__(self):
        super().__post_init__()
        windows = self.attention_window
        if isinstance(windows, int):
            windows = [windows] * self.num_hidden_layers
        windows = [int(w) for w in windows]
        if len(windows) != self.num_hidden_layers:
            raise ValueError(f"attention_window has {len(windows)} entries for {self.num_hidden_layers} layers")
        if any(w <= 0 or w % 2 for w in windows):
            raise ValueError(f"attention_window values must be positive and even, got {windows}")
        self.attention_window = windows

    @staticmethod
    def _model_types() -> tuple[str, ...]:
        return ("longformer",)

    @classmethod
    def _hf_specific(cls, config: dict) -> dict:
        return {"attention_window": config.get("attention_window", 512)}

    def to_hf_config(self) -> dict:
        config = super().to_hf_config()
        config["attention_window"] = list(self.attention_window)
        return config


LongformerConfig.PRESETS = {
    "longformer-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                            attention_window=64, hf_extra=dict(bos_token_id=0, eos_token_id=2, sep_token_id=2)),
    # allenai/longformer-base-4096
    "longformer-base": dict(attention_window=512, hf_extra=dict(bos_token_id=0, eos_token_id=2, sep_token_id=2)),
}


class LongformerSelfAttention(SelfAttention):
    """Sliding-window attention with Longformer's global tokens (see the module docstring)."""

    def __init__(self, config: LongformerConfig, layer: int):
        super().__init__(config)
        self.one_sided = config.attention_window[layer] // 2
        self.query_global = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_global = nn.Linear(config.hidden_size, config.hidden_size)
        self.value_global = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        cu, n = batch.cu_seqlens, batch.max_seqlen
        glob = batch.extra.get("global")
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        y = flash_attention_varlen(q, k, v, cu, cu, n, n, window=(self.one_sided, self.one_sided),
                                   global_tokens=None if glob is None else glob["mask"])
        if glob is not None:
            # The global rows again, with the global projections, over every token of their sequence.
            rows = glob["rows"]
            qg = self.heads(self.query_global(x[rows]))
            kg, vg = self.heads(self.key_global(x)), self.heads(self.value_global(x))
            yg = flash_attention_varlen(qg, kg, vg, glob["cu_seqlens"], cu, glob["max_seqlen"], n)
            y = y.index_copy(0, rows, yg)
        return self.out(y.reshape(x.shape))


class Longformer(BERT):
    """The Longformer encoder: :class:`BERT`'s inputs plus ``global_attention_mask``
    (same layout as ``input_ids``, 1 = global attention; ignored at padding).

    Positions are RoBERTa's (from the input ids, offset pad_token_id + 1).
    Unlike transformers, nothing is padded to a multiple of the window: the
    kernel handles any length.
    """

    config_class = LongformerConfig
    _HF_ARCH = {"longformer": "LongformerModel"}

    def _attention(self, config, layer: int) -> nn.Module:
        return LongformerSelfAttention(config, layer)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, **inputs):
        """``inputs``: token_type_ids, position_ids, cu_seqlens, max_seqlen (see :class:`BERT`)."""
        return super().forward(input_ids, attention_mask, global_attention_mask=global_attention_mask, **inputs)

    def _prepare_attention(self, batch: PackedBatch, input_ids, attention_mask, global_attention_mask=None):
        if global_attention_mask is None:
            return
        if not isinstance(global_attention_mask, torch.Tensor) or global_attention_mask.shape != input_ids.shape:
            shape = tuple(global_attention_mask.shape) if isinstance(global_attention_mask, torch.Tensor) else None
            raise ValueError(f"global_attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {shape}")
        if global_attention_mask.dtype != torch.bool and bool(
                ((global_attention_mask != 0) & (global_attention_mask != 1)).any()):
            raise ValueError("global_attention_mask must hold 0 (local) and 1 (global)")
        mask = batch.pack(global_attention_mask.to(input_ids.device)).bool()  # padding is never global
        if not bool(mask.any()):
            return
        # Global rows per sequence, as cu_seqlens for the global-query attention call.
        counts = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().cumsum(0)])[batch.cu_seqlens.long()]
        batch.extra["global"] = dict(mask=mask, rows=mask.nonzero().flatten(), cu_seqlens=counts.to(torch.int32),
                                     max_seqlen=int((counts[1:] - counts[:-1]).max()))

    @classmethod
    def from_roberta(cls, roberta_model_or_dir, max_positions: int = 4096, attention_window: int | list[int] = 512,
                     **overrides):
        """A Longformer initialised from RoBERTa (the Longformer paper's recipe).

        RoBERTa's position embeddings (after its 2 offset rows) are copied
        repeatedly to fill ``max_positions``; the global projections start as
        copies of the local ones. Takes a transformers RoBERTa model (base or
        with the masked-LM head), a local checkpoint directory, or an llmkit
        RoBERTa model. On inputs within RoBERTa's length and a window covering
        them, the result computes exactly what RoBERTa does. Returned in eval
        mode (call ``train()`` to continue pretraining).
        """
        if isinstance(roberta_model_or_dir, _HFModel):
            src = roberta_model_or_dir
            hf_config = src.config.to_hf_config()
            names = src._hf_names()
            state = {names[k]: v for k, v in src.state_dict().items()}
        else:
            hf_config, state = load_hf_checkpoint(roberta_model_or_dir)
        if hf_config.get("model_type") != "roberta":
            raise ValueError(f"from_roberta needs a RoBERTa checkpoint, got model_type {hf_config.get('model_type')!r}")
        roberta = BertConfig.from_hf_config(hf_config)
        fields = {f.name: getattr(roberta, f.name) for f in dataclasses.fields(BertConfig)}
        offset = roberta.position_offset
        fields.update(model_type="longformer", max_position_embeddings=max_positions + offset,
                      attention_window=attention_window, **overrides)
        config = LongformerConfig(**fields)

        converted = {}
        for name, tensor in state.items():
            name = name[len("roberta."):] if name.startswith("roberta.") else name
            if name.split(".")[0] in ("embeddings", "encoder", "pooler"):
                name = "longformer." + name
            converted[name] = tensor
            for proj in ("query", "key", "value"):
                if f".attention.self.{proj}." in name:
                    converted[name.replace(f".{proj}.", f".{proj}_global.")] = tensor.clone()
        key = "longformer.embeddings.position_embeddings.weight"
        old = converted[key]
        table = old.new_empty(max_positions + offset, old.shape[1])
        table[:offset] = old[:offset]
        learned = old[offset:]
        table[offset:] = learned.repeat(math.ceil(max_positions / learned.shape[0]), 1)[:max_positions]
        converted[key] = table
        return cls._from_hf_state(config, converted).eval()  # eval mode, as every loaded model


class LongformerForMaskedLM(BertForMaskedLM):
    """Longformer with RoBERTa's masked-LM head (transformers' LongformerForMaskedLM).

    ``forward(input_ids, attention_mask=None, labels=None, global_attention_mask=None, ...)``.
    """

    config_class = LongformerConfig
    encoder_class = Longformer
    _HF_ARCH = {"longformer": "LongformerForMaskedLM"}
    from_roberta = classmethod(Longformer.from_roberta.__func__)
