"""T5: the encoder-decoder transformer of Raffel et al. (2020), on llmkit's attention.

One file, read top to bottom: the config, the pieces (RMS layer norm, the
relative position bias, attention, feed-forward, blocks), then :class:`T5`
(= transformers' ``T5ForConditionalGeneration``): encode, decode, loss,
greedy generation with a KV cache, and Hugging Face checkpoints both ways.

What makes T5 T5:
  * no absolute positions: each stack's first layer turns (key - query)
    offsets into log-spaced buckets, looks up one learned scalar per head and
    bucket, and every layer of the stack adds that same bias to its scores
    (bidirectional buckets in the encoder, past-only in the decoder);
  * no 1/sqrt(d) scaling of the scores (softmax_scale=1.0); the scale is
    folded into the initialisation of the query weights;
  * RMS layer norm without mean or bias, applied before each sublayer;
  * with tied embeddings the decoder output is scaled by d_model**-0.5
    before the (shared) output projection.

Every attention goes through :func:`llmkit.ops.flash_attention` with
``attn_bias``: the position bias plus padding as -inf (exact: a hidden key
gets probability 0). The bias has CPU kernels only for now, so on CUDA the
attention falls back to torch's SDPA with the same bias.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..ops import flash_attention
from .common import ModelOutput, check_input_ids, count_parameters
from .hf_io import PretrainedIO, apply_overrides, assign_weights, check_keys

IGNORE_INDEX = -100  # label value the loss skips (as transformers)


# ------------------------------------------------------------------ config --

@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head size; heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (T5) or "gated-gelu" (T5 v1.1, mT5, Flan-T5)
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True  # lm_head = shared embedding, output scaled by d_model**-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dropout_rate: float = 0.1

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward_proj must be 'relu' or 'gated-gelu', got {self.feed_forward_proj!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_decoder_layers < 0:
            raise ValueError(f"num_decoder_layers must be >= 0, got {self.num_decoder_layers}")
        if self.d_kv % 8 != 0 or self.d_kv > 256:
            raise ValueError(f"d_kv must be a multiple of 8 up to 256 (llmkit's attention kernels), got {self.d_kv}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "T5Config":
        if name not in PRESETS:
            raise ValueError(f"unknown T5 preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "T5Config":
        """From a transformers T5Config dict (``config.to_dict()`` or config.json)."""
        if hf.get("model_type", "t5") != "t5":
            raise ValueError(f"not a T5 config: model_type is {hf.get('model_type')!r}")
        known = {f.name for f in fields(cls)} - {"tie_word_embeddings"}
        kwargs = {k: hf[k] for k in known if hf.get(k) is not None}
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            kwargs["eos_token_id"] = eos[0]
        # transformers >= 5 always ties the modules and keeps the rescale as
        # scale_decoder_outputs (False for T5 v1.1); older configs say it with
        # tie_word_embeddings alone.
        kwargs["tie_word_embeddings"] = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
        return cls(**kwargs)

    def to_hf_config(self) -> dict:
        """A config dict transformers' T5Config / from_pretrained reads."""
        hf = asdict(self)
        gated = self.feed_forward_proj == "gated-gelu"
        hf.update(model_type="t5", architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
                  dense_act_fn="gelu_new" if gated else "relu", is_gated_act=gated, initializer_factor=1.0,
                  use_cache=True)
        return hf


PRESETS = {
    # For tests and CPU demos: ~0.2M parameters.
    "t5-tiny": T5Config(vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128),
    # google-t5/t5-small: 60.5M parameters.
    "t5-small": T5Config(),
}
T5Config.PRESETS = PRESETS  # every family's config class lists its presets as PRESETS


# ----------------------------------------------------------------- pieces --

class T5LayerNorm(nn.Module):
    """RMS norm: x / rms(x) * weight, no mean subtraction and no bias (in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each (key - query) offset: exact for small distances, then
    log-spaced up to max_distance, beyond which all share the last bucket.
    Bidirectional (encoder) spends half the buckets on each direction;
    otherwise (decoder) only the past counts and future offsets go to 0."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # The same float32 arithmetic as the original, so the buckets agree at their edges.
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).to(torch.long)
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), as a (1, heads, q_len, k_len) score bias."""

    def __init__(self, config: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nn.Embedding(self.num_buckets, config.num_heads)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        device = self.embedding.weight.device
        query = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, heads, q_len, k_len)


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seqlen) 1/0 mask -> (batch, 1, 1, seqlen) bias: 0 for tokens, -inf for padding."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask.bool(), float("-inf"))[:, None, None, :]


def attend(q, k, v, bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(q k^T + bias) v (no scaling), (batch, seqlen, heads, d_kv) layout."""
    if q.is_cuda and bias is not None:
        # attn_bias has CPU kernels only for now: same math through SDPA.
        if causal:
            sq, sk = q.shape[1], k.shape[1]
            hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
            bias = bias.masked_fill(hidden, float("-inf"))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias.to(q.dtype), scale=1.0)
        return out.transpose(1, 2)
    return flash_attention(q, k, v, causal=causal, softmax_scale=1.0, attn_bias=bias)


class T5Attention(nn.Module):
    """Multi-head attention without biases or score scaling; self or cross."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k(source)), self.split_heads(self.v(source))

    def forward(self, x, kv=None, bias=None, causal=False):
        """x (batch, q_len, d_model); kv: precomputed (k, v) (cross attention,
        or the cached past plus these positions); default: self-attention."""
        q = self.split_heads(self.q(x))
        k, v = self.project_kv(x) if kv is None else kv
        out = attend(q, k, v, bias, causal)
        return self.o(out.flatten(2))


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:  # T5 v1.1: gelu(x W0) * (x W1), GELU with the tanh approximation ("gelu_new")
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        if self.gated:
            hidden = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            hidden = F.relu(self.wi(x))
        return self.wo(self.dropout(hidden))


class EncoderBlock(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.self_attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attn = T5Attention(config)
        self.ff_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = T5FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias):
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), bias=bias))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.self_attn_norm = T5LayerNorm(config.d_model, eps)
        self.self_attn = T5Attention(config)
        self.cross_attn_norm = T5LayerNorm(config.d_model, eps)
        self.cross_attn = T5Attention(config)
        self.ff_norm = T5LayerNorm(config.d_model, eps)
        self.ff = T5FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, self_bias, cross_kv, cross_bias, past_kv=None):
        """Returns (x, (k, v) of the self-attention so far: the cache's next entry)."""
        normed = self.self_attn_norm(x)
        k, v = self.self_attn.project_kv(normed)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=1), torch.cat([past_kv[1], v], dim=1)
        x = x + self.dropout(self.self_attn(normed, kv=(k, v), bias=self_bias, causal=True))
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), kv=cross_kv, bias=cross_bias))
        return x + self.dropout(self.ff(self.ff_norm(x))), (k, v)


def _decoder_block_output(block: DecoderBlock, x, self_bias, cross_kv, cross_bias):
    """A decoder block's hidden states only (no cache to fill): what a checkpointed training forward keeps."""
    return block(x, self_bias, cross_kv, cross_bias)[0]


class DecoderCache:
    """What incremental decoding keeps: each layer's self-attention K/V so far,
    the cross-attention K/V of the encoder output (computed once) and its
    padding bias."""

    def __init__(self, cross_kv: list, cross_bias: torch.Tensor | None):
        self.self_kv: list = [None] * len(cross_kv)
        self.cross_kv = cross_kv
        self.cross_bias = cross_bias
        self.length = 0  # decoder positions seen


# ------------------------------------------------------------------- model --

class T5(PretrainedIO, nn.Module):
    """T5 encoder-decoder with a language-modelling head (T5ForConditionalGeneration)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder_position_bias = RelativePositionBias(config, bidirectional=True)
        self.encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.encoder_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.decoder_position_bias = RelativePositionBias(config, bidirectional=False)
        self.decoder = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_decoder_layers))
        self.decoder_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size,
                                                                         bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False
        self._checkpoint_kwargs = {"use_reentrant": False}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """T5's initialisation: each weight ~ N(0, 1/fan_in), the queries also
        by 1/d_kv (the score scaling T5 leaves out), embeddings N(0, 1)."""
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        for module in self.modules():
            if isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
                for lin in (module.k, module.v):
                    nn.init.normal_(lin.weight, std=c.d_model ** -0.5)
                nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            elif isinstance(module, T5FeedForward):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(module, name):
                        nn.init.normal_(getattr(module, name).weight, std=c.d_model ** -0.5)
                nn.init.normal_(module.wo.weight, std=c.d_ff ** -0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.embedding.weight, std=c.d_model ** -0.5)
            elif isinstance(module, T5LayerNorm):
                module.weight.fill_(1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=c.d_model ** -0.5)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "T5":
        return cls(T5Config.from_preset(name, **overrides))

    def num_parameters(self) -> int:
        return count_parameters(self)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder and decoder block's activations in the
        backward pass instead of keeping them (transformers' name): less memory
        for one more forward, in training forwards with grad enabled; cached
        decoding is untouched. ``gradient_checkpointing_kwargs`` go to
        torch.utils.checkpoint.checkpoint (default use_reentrant=False)."""
        self._checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    # ------------------------------------------------------------ checks --

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        check_input_ids(ids, self.config.vocab_size, name)
        if ids.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, seqlen), got shape {tuple(ids.shape)}")

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, ids: torch.Tensor, name: str) -> None:
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of 1 (token) / 0 (padding), got {type(mask).__name__}")
        if mask.shape != ids.shape:
            raise ValueError(f"{name} must have the ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")

    def _check_labels(self, labels: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError("labels must be an int64 tensor of token ids (-100: ignored)")
        if labels.dim() != 2 or labels.numel() == 0:
            raise ValueError(f"labels must be non-empty 2-D (batch, seqlen), got shape {tuple(labels.shape)}")
        real = labels[labels != IGNORE_INDEX]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.config.vocab_size):
            raise ValueError(f"labels hold ids outside the vocabulary [0, {self.config.vocab_size}) "
                             f"(and other than {IGNORE_INDEX}, the ignored label)")

    # ----------------------------------------------------------- forward --

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden state (batch, seqlen, d_model)."""
        self._check_ids(input_ids, "input_ids")
        self._check_mask(attention_mask, input_ids, "attention_mask")
        x = self.dropout(self.shared(input_ids))
        seqlen = input_ids.shape[1]
        bias = self.encoder_position_bias(seqlen, seqlen)  # shared by every layer
        pad = padding_bias(attention_mask, bias.dtype)
        if pad is not None:
            bias = bias + pad
        checkpointed = self._checkpointing()
        for block in self.encoder:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, bias, **self._checkpoint_kwargs)
            else:
                x = block(x, bias)
        return self.dropout(self.encoder_norm(x))

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask=None, decoder_attention_mask=None,
               cache: DecoderCache | None = None) -> torch.Tensor:
        """The decoder's last hidden state (batch, tgt_len, d_model). With a
        cache, decoder_input_ids are the positions after ``cache.length`` and
        the cache is updated (no decoder_attention_mask then)."""
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        self._check_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask")
        if cache is not None and decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask is not supported with a cache")
        x = self.dropout(self.shared(decoder_input_ids))
        past = 0 if cache is None else cache.length
        tgt_len = decoder_input_ids.shape[1]
        self_bias = self.decoder_position_bias(tgt_len, past + tgt_len, q_offset=past)
        pad = padding_bias(decoder_attention_mask, self_bias.dtype)
        if pad is not None:
            self_bias = self_bias + pad
        if cache is None:
            cross_kv = [block.cross_attn.project_kv(encoder_hidden) for block in self.decoder]
            cross_bias = padding_bias(attention_mask, self_bias.dtype)
        else:
            cross_kv, cross_bias = cache.cross_kv, cache.cross_bias
        if cross_bias is not None:
            cross_bias = cross_bias.expand(-1, -1, tgt_len, -1)
        if cache is None and self._checkpointing():
            for i, block in enumerate(self.decoder):
                x = torch.utils.checkpoint.checkpoint(_decoder_block_output, block, x, self_bias, cross_kv[i],
                                                      cross_bias, **self._checkpoint_kwargs)
            return self.dropout(self.decoder_norm(x))
        for i, block in enumerate(self.decoder):
            past_kv = None if cache is None else cache.self_kv[i]
            x, kv = block(x, self_bias, cross_kv[i], cross_bias, past_kv)
            if cache is not None:
                cache.self_kv[i] = kv
        if cache is not None:
            cache.length += tgt_len
        return self.dropout(self.decoder_norm(x))

    def lm_logits(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the embedding matrix, on a rescaled input
            return F.linear(decoder_hidden * self.config.d_model ** -0.5, self.shared.weight)
        return self.lm_head(decoder_hidden)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: decoder inputs are the labels delayed by one, after
        decoder_start_token_id; ignored labels (-100) read as padding."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None) -> ModelOutput:
        """logits (batch, tgt_len, vocab); with labels, loss = mean cross-entropy
        over the labels other than -100 (and decoder inputs from the labels
        when not given). extra["encoder_last_hidden_state"]."""
        if labels is not None:
            self._check_labels(labels)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels (the decoder inputs are the labels "
                                 "shifted right)")
            decoder_input_ids = self.shift_right(labels)
        elif labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have decoder_input_ids' shape "
                             f"{tuple(decoder_input_ids.shape)}")
        encoder_hidden = self.encode(input_ids, attention_mask)
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"decoder_input_ids has batch {decoder_input_ids.shape[0]} but input_ids has "
                             f"{input_ids.shape[0]}")
        hidden = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)
        logits = self.lm_logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden,
                           extra={"encoder_last_hidden_state": encoder_hidden})

    # -------------------------------------------------------- generation --

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20) -> torch.Tensor:
        """Greedy decoding with a KV cache, as transformers' generate(do_sample=False):
        returns (batch, 1 + n) starting with decoder_start_token_id; a sequence
        that produced eos_token_id is padded with pad_token_id after it, and
        decoding stops when every sequence has or after max_new_tokens."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        c = self.config
        encoder_hidden = self.encode(input_ids, attention_mask)
        cache = DecoderCache([block.cross_attn.project_kv(encoder_hidden) for block in self.decoder],
                             padding_bias(attention_mask, encoder_hidden.dtype))
        batch = input_ids.shape[0]
        tokens = torch.full((batch, 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            hidden = self.decode(tokens[:, -1:], encoder_hidden, cache=cache)
            next_token = self.lm_logits(hidden[:, -1]).argmax(dim=-1)
            next_token = next_token.masked_fill(finished, c.pad_token_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= next_token == c.eos_token_id
            if bool(finished.all()):
                break
        return tokens

    # ------------------------------------------------ Hugging Face files --

    def _hf_names(self) -> dict[str, str]:
        """Our parameter name -> transformers' T5ForConditionalGeneration name."""
        names = {"shared.weight": "shared.weight",
                 "encoder_position_bias.embedding.weight":
                     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "encoder_norm.weight": "encoder.final_layer_norm.weight",
                 "decoder_position_bias.embedding.weight":
                     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "decoder_norm.weight": "decoder.final_layer_norm.weight"}
        ff = ("wi_0", "wi_1", "wo") if self.config.feed_forward_proj == "gated-gelu" else ("wi", "wo")

        def block(ours: str, theirs: str, sublayers):
            for index, (name, hf_name) in enumerate(sublayers):
                names[f"{ours}.{name}_norm.weight"] = f"{theirs}.layer.{index}.layer_norm.weight"
                if hf_name == "DenseReluDense":
                    for w in ff:
                        names[f"{ours}.ff.{w}.weight"] = f"{theirs}.layer.{index}.DenseReluDense.{w}.weight"
                else:
                    for w in "qkvo":
                        names[f"{ours}.{name}.{w}.weight"] = f"{theirs}.layer.{index}.{hf_name}.{w}.weight"

        for i in range(self.config.num_layers):
            block(f"encoder.{i}", f"encoder.block.{i}", [("self_attn", "SelfAttention"), ("ff", "DenseReluDense")])
        for i in range(self.config.num_decoder_layers):
            block(f"decoder.{i}", f"decoder.block.{i}", [("self_attn", "SelfAttention"),
                                                         ("cross_attn", "EncDecAttention"),
                                                         ("ff", "DenseReluDense")])
        if self.lm_head is not None:
            names["lm_head.weight"] = "lm_head.weight"
        return names

    # from_pretrained(path_or_hf_model, dtype=None, device=None, **config_overrides) and
    # save_pretrained(directory, tokenizer=None, ...) come from PretrainedIO (hf_io.py);
    # from_hf / to_hf are their older names.

    # Checkpoint names transformers ignores too: the stacks' copies of the shared
    # embedding, and a relative-attention table on the first cross-attention that
    # the original T5 checkpoints carry but no layer reads.
    _BENIGN_HF_KEYS = (r"^(encoder|decoder)\.embed_tokens\.weight$",
                       r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")

    @classmethod
    def _from_hf_parts(cls, hf_config: dict, state: dict, overrides: dict) -> "T5":
        """From a transformers T5ForConditionalGeneration object or checkpoint (keys checked both ways)."""
        owner = "T5.from_pretrained"
        model = cls(apply_overrides(T5Config.from_hf_config(hf_config), overrides, owner))
        names = model._hf_names()
        if model.lm_head is not None and "lm_head.weight" not in state and "shared.weight" in state:
            state = dict(state, **{"lm_head.weight": state["shared.weight"]})  # saved tied by transformers >= 5
        benign = cls._BENIGN_HF_KEYS + ((r"^lm_head\.weight$",) if model.lm_head is None else ())
        bodies = {k.split(".")[0] for k in names.values()}
        c = model.config
        check_keys(owner, names.values(), state, benign=benign, in_body=lambda k: k.split(".")[0] in bodies,
                   config_hint=f"num_layers={c.num_layers}, num_decoder_layers={c.num_decoder_layers}, "
                               f"d_model={c.d_model}, vocab_size={c.vocab_size}")
        assign_weights(model, {name: state[hf] for name, hf in names.items()}, owner, checkpoint_names=names)
        return model

    def _to_hf_parts(self) -> tuple[dict, dict]:
        """config.json + the state ``transformers.T5ForConditionalGeneration.from_pretrained`` loads."""
        params = dict(self.named_parameters())
        return self.config.to_hf_config(), {hf: params[name] for name, hf in self._hf_names().items()}
