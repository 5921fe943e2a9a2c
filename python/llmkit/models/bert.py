"""BERT and RoBERTa: bidirectional post-LN transformer encoders, padding-free.

One file for the family, read top to bottom: the config, the encoder
(embeddings -> blocks -> optional pooler), then the heads: masked LM,
pretraining (MLM + next-sentence prediction), sequence and token
classification. RoBERTa is a config of the same model (``model_type``
"roberta"): positions counted from the input ids with an offset of
``pad_token_id + 1``, and RoBERTa's head layouts.

Padding-free: a padded batch (``input_ids`` (batch, seqlen) + ``attention_mask``)
is packed to its real tokens once, every layer runs on (total_tokens, hidden)
and attention is llmkit's ``flash_attention_varlen`` over the packed
sequences; outputs are scattered back to (batch, seqlen, ...) at the end (0 at
padding). Already packed input (1-D ``input_ids`` + int32 ``cu_seqlens``, the
flash-attn convention) skips the packing and returns packed outputs.

``from_pretrained`` loads transformers' checkpoints (a model object or a
local directory) with identical outputs on the real tokens;
``save_pretrained`` writes a directory that transformers loads back (the
older names ``from_hf`` / ``to_hf`` are the same methods).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..ops.attention import flash_attention_varlen
from .common import ModelOutput, check_input_ids, check_length, count_parameters, pad, unpad
from .hf_io import PretrainedIO, apply_overrides, assign_weights, check_keys

__all__ = [
    "BertConfig", "BERT", "BertForMaskedLM", "BertForPreTraining",
    "BertForSequenceClassification", "BertForTokenClassification",
]


# ----------------------------------------------------------------- config ---

@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    # Kept for the config round trip only: llmkit's attention kernel has no
    # dropout on the attention probabilities, so training skips that one
    # (transformers applies it; every other dropout is applied here too).
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    initializer_range: float = 0.02
    num_labels: int = 2
    problem_type: str | None = None  # classification loss; None: chosen from num_labels and labels' dtype
    # "bert" or "roberta". RoBERTa counts positions from the input ids,
    # starting at pad_token_id + 1 (padding tokens get pad_token_id), and
    # uses its own classification / LM head layouts.
    model_type: str = "bert"
    # Other Hugging Face config keys carried through a round trip (special
    # token ids, label names).
    hf_extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in self._model_types():
            raise ValueError(f"model_type must be one of {self._model_types()}, got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads = {head_dim}: llmkit's attention "
                             "kernel needs a multiple of 8 up to 256")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose from {sorted(_ACTIVATIONS)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @staticmethod
    def _model_types() -> tuple[str, ...]:
        return ("bert", "roberta")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ids_positions(self) -> bool:
        """Positions from the input ids (RoBERTa, Longformer) rather than 0..seqlen-1 (BERT)."""
        return self.model_type != "bert"

    @property
    def position_offset(self) -> int:
        """The first position id: pad_token_id + 1 for RoBERTa, 0 for BERT."""
        return self.pad_token_id + 1 if self.ids_positions else 0

    @property
    def max_length(self) -> int:
        """The longest sequence the position table holds."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BertConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**copy.deepcopy(cls.PRESETS[name]), **overrides})

    # Keys of the Hugging Face config that map one to one onto ours.
    _HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                "initializer_range", "problem_type")
    _HF_EXTRA = ("bos_token_id", "eos_token_id", "sep_token_id", "id2label", "label2id")

    @classmethod
    def from_hf_config(cls, config: dict) -> "BertConfig":
        """Our config from a transformers config dict (``model.config.to_dict()`` or config.json)."""
        model_type = config.get("model_type")
        if model_type not in cls._model_types():
            raise ValueError(f"{cls.__name__} reads model_type {cls._model_types()}, got {model_type!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(f"position_embedding_type {config['position_embedding_type']!r}: "
                                      "only absolute position embeddings are supported")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise NotImplementedError("decoder / cross-attention BERT configs are not supported (encoder only)")
        if not config.get("tie_word_embeddings", True):
            raise NotImplementedError("tie_word_embeddings=False is not supported: "
                                      "the MLM decoder is tied to the word embeddings")
        kwargs = {k: config[k] for k in cls._HF_KEYS if config.get(k) is not None}
        kwargs.update(cls._hf_specific(config))
        if config.get("id2label"):
            kwargs["num_labels"] = len(config["id2label"])
        extra = {k: config[k] for k in cls._HF_EXTRA if config.get(k) is not None}
        labels = {int(i): name for i, name in extra.get("id2label", {}).items()}
        if labels == {i: f"LABEL_{i}" for i in range(len(labels))}:  # transformers' placeholder names
            extra.pop("id2label", None), extra.pop("label2id", None)
        return cls(model_type=model_type, hf_extra=extra, **kwargs)

    @classmethod
    def _hf_specific(cls, config: dict) -> dict:
        return {}

    def to_hf_config(self) -> dict:
        """A transformers config dict (config.json) for this model."""
        config = {k: getattr(self, k) for k in self._HF_KEYS}
        config.update(self.hf_extra)
        if "id2label" not in config or len(config["id2label"]) != self.num_labels:
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        config["id2label"] = {str(k): v for k, v in config["id2label"].items()}
        config.update(model_type=self.model_type, tie_word_embeddings=True)
        return config


BertConfig.PRESETS = {
    # google/bert_uncased_L-2_H-128_A-2: tests and CPU demos
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-base": dict(),  # bert-base-uncased, 110M
    "roberta-base": dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514,
                         type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                         hf_extra=dict(bos_token_id=0, eos_token_id=2)),
}

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


# ------------------------------------------------------------ the batch ----

@dataclass
class PackedBatch:
    """Where the packed tokens came from: the sequence boundaries (int32
    cu_seqlens, flash-attn's varlen convention) and, for a padded input, the
    flat indices of the real tokens to scatter outputs back."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor | None = None  # None: the input was packed already
    shape: tuple[int, int] | None = None  # (batch, seqlen) of a padded input
    extra: dict = field(default_factory=dict)  # per-family (Longformer's global tokens)

    @property
    def first_tokens(self) -> torch.Tensor:
        """Row of each sequence's first token ([CLS] / <s>) in the packed tensors."""
        return self.cu_seqlens[:-1].long()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """A per-token input (labels, ...) in the caller's layout -> packed."""
        return t if self.indices is None else t.flatten(0, 1)[self.indices]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """Packed per-token output -> the caller's layout (padding slots are 0)."""
        return t if self.indices is None else pad(t, self.indices, *self.shape)


def _check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of batch + 1 offsets [0, len0, len0 + len1, ...]")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens ({total}), "
                         f"got {cu_seqlens[0].item()} ... {cu_seqlens[-1].item()}")
    if bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequence), got {cu_seqlens.tolist()}")
    return cu_seqlens.to(torch.int32)


# ----------------------------------------------------------------- layers ---

class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over packed sequences."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        y = flash_attention_varlen(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen)
        return self.out(y.reshape(x.shape))


class Block(nn.Module):
    """Post-LN transformer block (the original BERT ordering: norm after each residual add)."""

    def __init__(self, config: BertConfig, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, batch)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


def _init_weights(module: nn.Module, std: float) -> None:
    # BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -------------------------------------------------- loading and saving ----

# Our parameter names -> transformers' (BertModel / RobertaModel / LongformerModel layout).
_HF_ENCODER_NAMES = [
    (r"word_embeddings\.", "embeddings.word_embeddings."),
    (r"position_embeddings\.", "embeddings.position_embeddings."),
    (r"token_type_embeddings\.", "embeddings.token_type_embeddings."),
    (r"emb_norm\.", "embeddings.LayerNorm."),
    (r"layers\.(\d+)\.attn\.(query|key|value)(_global)?\.", r"encoder.layer.\1.attention.self.\2\3."),
    (r"layers\.(\d+)\.attn\.out\.", r"encoder.layer.\1.attention.output.dense."),
    (r"layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"layers\.(\d+)\.ffn_in\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.ffn_out\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.ffn_norm\.", r"encoder.layer.\1.output.LayerNorm."),
    (r"pooler\.", "pooler.dense."),
]


def _rename(name: str, table) -> str:
    for pattern, replacement in table:
        new, n = re.subn("^" + pattern, replacement, name)
        if n:
            return new
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


class _HFModel(PretrainedIO, nn.Module):
    """from_pretrained / save_pretrained / presets shared by the encoder and its heads.

    Subclasses define ``_hf_names()`` (our parameter name -> transformers'
    name, in the layout of the transformers class with a head, encoder
    under ``bert.`` / ``roberta.`` / ``longformer.``), ``_head_params`` (names
    that may be missing from a checkpoint and are then freshly initialised,
    e.g. a new classifier on a pretrained encoder) and ``_HF_ARCH``.
    """

    config_class = BertConfig
    _HF_ARCH: dict[str, str] = {}
    _head_params: tuple[str, ...] = ()

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A randomly initialised model of a named size (``BertConfig.from_preset``)."""
        return cls(cls.config_class.from_preset(name, **overrides))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (tied counted once); optionally without the embedding tables."""
        n = count_parameters(self)
        if exclude_embeddings:
            enc = self._body()
            n -= sum(e.weight.numel() for e in (enc.word_embeddings, enc.position_embeddings,
                                                  enc.token_type_embeddings))
        return n

    def _body(self) -> "BERT":
        return self  # the encoder (heads override)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder block's activations in the backward pass
        instead of keeping them (transformers' name): less memory for one more
        forward, in training forwards with grad enabled. A head model turns
        it on for its encoder. ``gradient_checkpointing_kwargs`` go to
        torch.utils.checkpoint.checkpoint (default use_reentrant=False)."""
        body = self._body()
        body._checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        body.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._body().gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self._body().word_embeddings

    @classmethod
    def _build_for_checkpoint(cls, config, state: dict):
        return cls(config)

    # from_pretrained(path_or_hf_model, dtype=None, device=None, **config_overrides) and
    # save_pretrained(directory, tokenizer=None, ...) come from PretrainedIO (hf_io.py);
    # from_hf / to_hf are their older names. Encoder weights must all be present
    # and the checkpoint's encoder must have no weights the config does not use;
    # head weights missing from the checkpoint (a classifier on a base model) are
    # freshly initialised with a warning, other architectures' heads ignored.

    @classmethod
    def _from_hf_parts(cls, hf_config: dict, state: dict, overrides: dict):
        config = apply_overrides(cls.config_class.from_hf_config(hf_config), overrides,
                                 f"{cls.__name__}.from_pretrained")
        return cls._from_hf_state(config, state)

    @classmethod
    def _from_hf_state(cls, config, state: dict):
        owner = f"{cls.__name__}.from_pretrained"
        prefix = cls._hf_prefix(config.model_type)
        state = {_legacy_name(k): v for k, v in state.items()}
        # A base-model checkpoint (BertModel) has no prefix; a head model's has.
        state = {(f"{prefix}.{k}" if k.split(".")[0] in ("embeddings", "encoder", "pooler") else k): v
                 for k, v in state.items()}
        model = cls._build_for_checkpoint(config, state)
        names = model._hf_names()
        ours = model.state_dict()
        # A head (or the pooler, absent from e.g. masked-LM checkpoints) may be new; the encoder may not.
        optional = {names[n] for n in ours if n.startswith(model._head_params + ("pooler.", "encoder.pooler."))}
        new_heads, _ = check_keys(
            owner, {names[n] for n in ours}, state, optional=optional,
            benign=(r"embeddings\.(position_ids|token_type_ids)$", rf"^{prefix}\.pooler\.",
                    r"^(cls\.predictions|lm_head)\.decoder\.(weight|bias)$"),  # buffers, the tied decoder
            in_body=lambda k: k.startswith(prefix + "."),
            config_hint=f"{config.model_type}, num_hidden_layers={config.num_hidden_layers}, "
                        f"hidden_size={config.hidden_size}, vocab_size={config.vocab_size}")
        if new_heads:
            warnings.warn(f"{owner}: the checkpoint has no {new_heads}; they are newly initialised "
                          "(train them before use)", stacklevel=3)
        hf_to_ours = {hf: n for n, hf in names.items()}
        weights = {hf_to_ours[hf]: state[hf] for hf in set(names.values()) if hf in state}
        assign_weights(model, weights, owner, skip=[hf_to_ours[hf] for hf in new_heads], checkpoint_names=names)
        return model

    def _to_hf_parts(self) -> tuple[dict, dict]:
        config = self.config.to_hf_config()
        arch = self._HF_ARCH.get(self.config.model_type)
        if arch is None:
            raise ValueError(f"{type(self).__name__} has no transformers counterpart for "
                             f"model_type {self.config.model_type!r}")
        config["architectures"] = [arch]
        names = self._hf_names()
        prefix = self._hf_prefix(self.config.model_type) + "."
        state = {}
        for name, tensor in self.state_dict().items():
            hf = names[name]
            if self._body() is self and hf.startswith(prefix):
                hf = hf[len(prefix):]  # BertModel's own checkpoints have no prefix
            state[hf] = tensor
        return config, state

    @staticmethod
    def _hf_prefix(model_type: str) -> str:
        return model_type  # the attribute transformers' head models keep the encoder in

    def _encoder_hf_names(self, ours_prefix: str = "") -> dict[str, str]:
        hf_prefix = self._hf_prefix(self.config.model_type) + "."
        return {ours_prefix + n: hf_prefix + _rename(n, _HF_ENCODER_NAMES) for n in self._body().state_dict()}


def _legacy_name(name: str) -> str:
    # Old TF-converted checkpoints name LayerNorm parameters gamma / beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


# ---------------------------------------------------------------- encoder ---

class BERT(_HFModel):
    """The encoder: embeddings, ``num_hidden_layers`` post-LN blocks, optional pooler.

    Inputs (``forward``), either
      * padded: ``input_ids`` (batch, seqlen) and ``attention_mask``
        (batch, seqlen), 1 for real tokens (default: all real), or
      * packed: ``input_ids`` (total,) with ``cu_seqlens`` int (batch + 1),
        sequence b in ``input_ids[cu_seqlens[b]:cu_seqlens[b + 1]]``.
    ``token_type_ids`` and ``position_ids`` (optional) in the same layout as
    ``input_ids``. Default positions follow transformers: BERT uses the
    index in the (padded) row, RoBERTa counts non-pad ids from
    ``pad_token_id + 1``; right-padded and packed batches give the same
    outputs.

    Returns ``ModelOutput(last_hidden_state=..., extra={"pooler_output": ...})``:
    hidden states in the input's layout (0 at padding) and, with the pooler,
    ``tanh(W h_[CLS] + b)`` per sequence (the first real token of each row).
    """

    _HF_ARCH = {"bert": "BertModel", "roberta": "RobertaModel"}

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        pos_pad = config.pad_token_id if config.ids_positions else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=pos_pad)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.emb_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(Block(config, self._attention(config, i)) for i in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self._checkpoint_kwargs = {"use_reentrant": False}
        _init_weights(self, config.initializer_range)

    def _attention(self, config, layer: int) -> nn.Module:
        return SelfAttention(config)

    @classmethod
    def _build_for_checkpoint(cls, config, state):
        # Keep the pooler when the checkpoint has one (BertModel, BertForPreTraining, ...).
        return cls(config, add_pooling_layer=f"{cls._hf_prefix(config.model_type)}.pooler.dense.weight" in state)

    def _hf_names(self) -> dict[str, str]:
        return self._encoder_hf_names()

    # -- input handling --

    def pack_inputs(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                    cu_seqlens=None, max_seqlen=None):
        """Check the inputs and pack them: (ids, token types, positions, PackedBatch), all (total,)."""
        cfg = self.config
        check_input_ids(input_ids, cfg.vocab_size)
        if cu_seqlens is not None:  # packed input
            if input_ids.dim() != 1:
                raise ValueError(f"with cu_seqlens, input_ids must be packed 1-D (total,), "
                                 f"got shape {tuple(input_ids.shape)}")
            if attention_mask is not None:
                raise ValueError("packed input (cu_seqlens) has no padding: leave attention_mask None")
            cu = _check_cu_seqlens(cu_seqlens.to(input_ids.device), input_ids.shape[0])
            longest = int((cu[1:] - cu[:-1]).max())
            batch = PackedBatch(cu, longest if max_seqlen is None else int(max_seqlen))
            if batch.max_seqlen < longest:
                raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest sequence ({longest})")
            ids = input_ids
            if position_ids is None:
                position_ids = self._packed_positions(ids, cu)
        else:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seqlen), or packed (total,) with cu_seqlens; "
                                 f"got shape {tuple(input_ids.shape)}")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
            if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold 0 (padding) and 1 (real token)")
            empty = (~attention_mask.bool()).all(dim=1).nonzero().flatten()
            if empty.numel():
                raise ValueError(f"row {int(empty[0])} of attention_mask has no real token")
            if position_ids is None:
                position_ids = self._padded_positions(input_ids)
            indices, cu, longest = unpad(attention_mask)
            batch = PackedBatch(cu, longest, indices, tuple(input_ids.shape))
            ids = batch.pack(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
        token_type_ids, position_ids = batch.pack(token_type_ids), batch.pack(position_ids)
        check_input_ids(token_type_ids, cfg.type_vocab_size, "token_type_ids")
        self._check_positions(position_ids)
        return ids.long(), token_type_ids.long(), position_ids.long(), batch

    def _padded_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not cfg.ids_positions:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # RoBERTa (fairseq's make_positions): count the non-pad ids, pad ids keep position pad_token_id.
        real = input_ids.ne(cfg.pad_token_id).long()
        return real.cumsum(1) * real + cfg.pad_token_id

    def _packed_positions(self, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        lengths = (cu[1:] - cu[:-1]).long()
        starts = cu[:-1].long().repeat_interleave(lengths)
        if not cfg.ids_positions:
            return torch.arange(ids.shape[0], device=ids.device) - starts
        real = ids.ne(cfg.pad_token_id).long()
        counts = torch.cat([real.new_zeros(1), real.cumsum(0)])
        return (counts[1:] - counts[starts]) * real + cfg.pad_token_id

    def _check_positions(self, position_ids: torch.Tensor) -> None:
        cfg = self.config
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0:
            raise ValueError(f"position_ids holds {low}; positions must be >= 0")
        check_length(high - cfg.position_offset + 1, cfg.max_length)

    # -- forward --

    def embed(self, ids, token_type_ids, position_ids) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids) \
            + self.position_embeddings(position_ids)
        return self.dropout(self.emb_norm(x))

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               cu_seqlens=None, max_seqlen=None, **attention_inputs) -> tuple[torch.Tensor, PackedBatch]:
        """The packed final hidden states (total, hidden) and the batch layout."""
        ids, types, positions, batch = self.pack_inputs(input_ids, attention_mask, token_type_ids, position_ids,
                                                        cu_seqlens, max_seqlen)
        self._prepare_attention(batch, input_ids, attention_mask, **attention_inputs)
        x = self.embed(ids, types, positions)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(layer, x, batch, **self._checkpoint_kwargs)
            else:
                x = layer(x, batch)
        return x, batch

    def _prepare_attention(self, batch: PackedBatch, input_ids, attention_mask, **attention_inputs) -> None:
        if attention_inputs:
            raise TypeError(f"{type(self).__name__} got unexpected inputs {sorted(attention_inputs)}")

    def pool(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.pooler is None:
            raise ValueError("this model has no pooler (built with add_pooling_layer=False)")
        return torch.tanh(self.pooler(x[batch.first_tokens]))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                cu_seqlens=None, max_seqlen=None, **attention_inputs) -> ModelOutput:
        x, batch = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                               **attention_inputs)
        extra = {"pooler_output": self.pool(x, batch)} if self.pooler is not None else {}
        return ModelOutput(last_hidden_state=batch.unpack(x), extra=extra)


# ------------------------------------------------------------------ heads ---

class _Head(_HFModel):
    """A task head on top of the encoder ``self.encoder`` (a :class:`BERT`)."""

    encoder_class = BERT

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False):
        super().__init__()
        self.config = config
        self.encoder = self.encoder_class(config, add_pooling_layer=add_pooling_layer)

    def _body(self) -> BERT:
        return self.encoder

    @property
    def gradient_checkpointing(self) -> bool:
        """The encoder's setting: a head has no blocks of its own."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def _hf_names(self) -> dict[str, str]:
        names = self._encoder_hf_names("encoder.")
        names.update(self._head_hf_names())
        return names

    def _head_hf_names(self) -> dict[str, str]:
        raise NotImplementedError

    def _classifier_dropout(self) -> nn.Dropout:
        p = self.config.classifier_dropout
        return nn.Dropout(self.config.hidden_dropout_prob if p is None else p)


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> logits with the word embeddings (tied) + a bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        # BERT's transform uses hidden_act; RoBERTa's (and Longformer's) LM head is always exact gelu.
        self.act = _ACTIVATIONS[config.hidden_act if config.model_type == "bert" else "gelu"]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # The decoder is the (tied) input embedding matrix: one table, two uses.
        return F.linear(self.norm(self.act(self.dense(x))), word_embeddings, self.bias)

    @staticmethod
    def hf_names(model_type: str) -> dict[str, str]:
        base = "cls.predictions." if model_type == "bert" else "lm_head."
        transform = base + "transform." if model_type == "bert" else base
        norm = "LayerNorm" if model_type == "bert" else "layer_norm"
        names = {"mlm.bias": base + "bias"}
        for p in ("weight", "bias"):
            names[f"mlm.dense.{p}"] = f"{transform}dense.{p}"
            names[f"mlm.norm.{p}"] = f"{transform}{norm}.{p}"
        return names


def _token_loss(logits: torch.Tensor, labels, batch: PackedBatch):
    if labels is None:
        return None
    # Labels at padding are ignored (there are no logits there).
    labels = batch.pack(labels.to(logits.device))
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)


class BertForMaskedLM(_Head):
    """Masked language model: ``logits`` (batch, seqlen, vocab) in the input's layout,
    ``loss`` = mean cross-entropy over ``labels != -100`` when labels are given."""

    _HF_ARCH = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}
    _head_params = ("mlm.",)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.mlm = MLMHead(config)
        _init_weights(self.mlm, config.initializer_range)

    def _head_hf_names(self):
        return MLMHead.hf_names(self.config.model_type)

    def forward(self, input_ids, attention_mask=None, labels=None, **inputs) -> ModelOutput:
        """``inputs``: token_type_ids, position_ids, cu_seqlens, max_seqlen (see :class:`BERT`)."""
        x, batch = self.encoder.encode(input_ids, attention_mask, **inputs)
        logits = self.mlm(x, self.encoder.word_embeddings.weight)
        return ModelOutput(logits=batch.unpack(logits), loss=_token_loss(logits, labels, batch),
                           last_hidden_state=batch.unpack(x))


class BertForPreTraining(_Head):
    """BERT's pretraining objective: masked LM + next-sentence prediction.

    ``logits`` are the MLM logits, ``extra["nsp_logits"]`` (batch, 2) from the
    pooled [CLS]; ``loss`` sums the MLM loss (``labels``) and the NSP loss
    (``next_sentence_label``, 0 = B follows A) of the labels given.
    """

    _HF_ARCH = {"bert": "BertForPreTraining"}
    _head_params = ("mlm.", "nsp.")

    def __init__(self, config: BertConfig):
        super().__init__(config, add_pooling_layer=True)
        self.mlm = MLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2)
        _init_weights(self.mlm, config.initializer_range)
        _init_weights(self.nsp, config.initializer_range)

    def _head_hf_names(self):
        names = MLMHead.hf_names(self.config.model_type)
        names.update({f"nsp.{p}": f"cls.seq_relationship.{p}" for p in ("weight", "bias")})
        return names

    def forward(self, input_ids, attention_mask=None, labels=None, next_sentence_label=None,
                **inputs) -> ModelOutput:
        x, batch = self.encoder.encode(input_ids, attention_mask, **inputs)
        logits, nsp_logits = self.mlm(x, self.encoder.word_embeddings.weight), self.nsp(self.encoder.pool(x, batch))
        losses = [_token_loss(logits, labels, batch)]
        if next_sentence_label is not None:
            losses.append(F.cross_entropy(nsp_logits.float(), next_sentence_label.to(nsp_logits.device).long()))
        losses = [term for term in losses if term is not None]
        return ModelOutput(logits=batch.unpack(logits), loss=sum(losses) if losses else None,
                           last_hidden_state=batch.unpack(x), extra={"nsp_logits": nsp_logits})


class BertForSequenceClassification(_Head):
    """One label (or regression value) per sequence, from its first token.

    BERT: dropout -> linear on the pooler output. RoBERTa: dense -> tanh ->
    out_proj on <s> (no pooler), as in transformers. ``logits`` (batch,
    num_labels). The loss follows transformers' problem_type: regression
    (MSE) when num_labels == 1, cross-entropy for integer labels, else
    multi-label BCE.
    """

    _HF_ARCH = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}
    _head_params = ("classifier.",)

    def __init__(self, config: BertConfig):
        super().__init__(config, add_pooling_layer=config.model_type == "bert")
        self.dropout = self._classifier_dropout()
        self.classifier = nn.ModuleDict()
        if config.model_type != "bert":
            self.classifier["dense"] = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier["out_proj"] = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier, config.initializer_range)

    def _head_hf_names(self):
        if self.config.model_type == "bert":
            return {f"classifier.out_proj.{p}": f"classifier.{p}" for p in ("weight", "bias")}
        return {f"classifier.{m}.{p}": f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}

    def forward(self, input_ids, attention_mask=None, labels=None, **inputs) -> ModelOutput:
        x, batch = self.encoder.encode(input_ids, attention_mask, **inputs)
        if self.config.model_type == "bert":
            h = self.encoder.pool(x, batch)
        else:
            h = torch.tanh(self.classifier["dense"](self.dropout(x[batch.first_tokens])))
        logits = self.classifier["out_proj"](self.dropout(h))
        return ModelOutput(logits=logits, loss=self._loss(logits, labels), last_hidden_state=batch.unpack(x))

    def _loss(self, logits, labels):
        if labels is None:
            return None
        labels = labels.to(logits.device)
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.float().squeeze(-1) if self.config.num_labels == 1 else logits.float(),
                              labels.float().reshape(-1) if self.config.num_labels == 1 else labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float(), labels.reshape(-1).long())
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class BertForTokenClassification(_Head):
    """One label per token (NER, POS): dropout -> linear on every hidden state.
    ``logits`` (batch, seqlen, num_labels); ``loss`` cross-entropy over labels != -100."""

    _HF_ARCH = {"bert": "BertForTokenClassification", "roberta": "RobertaForTokenClassification"}
    _head_params = ("classifier.",)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dropout = self._classifier_dropout()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier, config.initializer_range)

    def _head_hf_names(self):
        return {f"classifier.{p}": f"classifier.{p}" for p in ("weight", "bias")}

    def forward(self, input_ids, attention_mask=None, labels=None, **inputs) -> ModelOutput:
        x, batch = self.encoder.encode(input_ids, attention_mask, **inputs)
        logits = self.classifier(self.dropout(x))
        return ModelOutput(logits=batch.unpack(logits), loss=_token_loss(logits, labels, batch),
                           last_hidden_state=batch.unpack(x))
