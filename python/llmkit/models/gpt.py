"""GPT: a decoder-only transformer on llmkit's flash attention.

One class covers GPT-2 (learned positions, LayerNorm, GELU MLP, biases, tied
embeddings) and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query
attention, no biases), picked by :class:`GPTConfig` fields, so the same code
runs nanoGPT-style training, Hugging Face checkpoints of both kinds, and
cached generation (:mod:`llmkit.generate`).

Layout of a block, pre-norm as in GPT-2 and Llama::

    x = x + attn(norm_1(x))        # q, k, v from one fused projection
    x = x + mlp(norm_2(x))         # GELU: fc -> gelu -> proj; SwiGLU: (gate, up) fused

Three ways to call the model, all through the same kernel:

* a (batch, seqlen) batch: ``flash_attention(causal=True)``;
* a padded batch with ``attention_mask`` or a packed batch (1-D input_ids +
  ``cu_seqlens``): padding-free, ``flash_attention_varlen``; positions
  restart at 0 in every sequence;
* with a :class:`KVCache`: the new tokens of each sequence are appended to
  its preallocated cache slot and attend to everything cached before them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..nn.loss import linear_cross_entropy
from ..nn.rope import RotaryEmbedding, rotate_half
from ..ops.attention import flash_attention, flash_attention_varlen
from ..ops.activation import gelu_tanh
from ..ops.linear import decode_linear
from .common import ModelOutput, check_input_ids, check_length, count_parameters, format_count, unpad
from .hf_io import PretrainedIO, apply_overrides, assign_weights, check_keys


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT` (defaults: GPT-2 124M).

    position: "learned" (GPT-2's table of block_size rows) or "rope".
    norm: "layernorm" or "rmsnorm". mlp: "gelu" (tanh approximation, GPT-2's
    gelu_new) or "swiglu". n_kv_head < n_head is grouped-query attention.
    sliding_window W lets a token see itself and the W - 1 tokens before it
    (Mistral). block_size is the longest sequence (the position table's
    length for learned positions).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    position: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    bias: bool = True
    qkv_bias: bool | None = None  # biases on q, k, v only (Qwen2); None: follow `bias`
    tie_word_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        for name, value, allowed in (("position", self.position, ("learned", "rope")),
                                     ("norm", self.norm, ("layernorm", "rmsnorm")),
                                     ("mlp", self.mlp, ("gelu", "swiglu"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 8 or not 0 < self.head_dim <= 256:
            raise ValueError(f"head_dim must be a multiple of 8 up to 256 (the attention kernel's limit), "
                             f"got {self.head_dim}")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_embd) < 1:
            raise ValueError("vocab_size, block_size, n_layer and n_embd must be positive")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose from {sorted(GPT_PRESETS)}")
        return cls(**{**GPT_PRESETS[name], **overrides})

    from_preset = preset  # the name BertConfig and T5Config use

    # ---------------------------------------------------- Hugging Face --
    @classmethod
    def from_hf_config(cls, hf: dict) -> "GPTConfig":
        """From a transformers config dict: model_type gpt2, llama, mistral or qwen2."""
        kind = hf.get("model_type")
        ids = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
                   pad_token_id=hf.get("pad_token_id"))
        if kind == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                                 "are not supported")
            if hf.get("scale_attn_weights", True) is False:
                raise ValueError("GPT-2 configs with scale_attn_weights=False are not supported")
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"GPT-2 activation {hf.get('activation_function')!r} is not supported "
                                 "(gelu_new / gelu_pytorch_tanh are)")
            return cls(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=hf.get("tie_word_embeddings", True), **ids)
        if kind in ("llama", "mistral", "qwen2"):
            if hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
                raise ValueError("RoPE scaling (rope_scaling / rope_parameters other than default) is not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (silu is)")
            theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            qkv_bias = kind == "qwen2" or hf.get("attention_bias", False)
            if hf.get("mlp_bias", False) or (kind != "qwen2" and qkv_bias):
                raise ValueError("Llama configs with attention_bias / mlp_bias are not supported")
            window = hf.get("sliding_window") if (kind == "mistral" or hf.get("use_sliding_window")) else None
            config = cls(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                         n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                         n_embd=hf["hidden_size"], n_kv_head=hf.get("num_key_value_heads"),
                         head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
                         position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                         tie_word_embeddings=hf.get("tie_word_embeddings", False),
                         norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                         sliding_window=window, qkv_bias=qkv_bias, **ids)
            return config
        raise ValueError(f"GPT.from_pretrained takes gpt2, llama, mistral or qwen2 checkpoints, "
                         f"got model_type {kind!r}")

    @property
    def hf_model_type(self) -> str:
        if self.position == "learned" and self.norm == "layernorm" and self.mlp == "gelu" and self.bias \
                and self.qkv_bias and self.n_kv_head == self.n_head and self.sliding_window is None \
                and self.head_dim * self.n_head == self.n_embd:
            return "gpt2"
        if self.position == "rope" and self.norm == "rmsnorm" and self.mlp == "swiglu" and not self.bias:
            if self.sliding_window:
                if self.qkv_bias:
                    raise ValueError("a sliding window with q/k/v biases matches no transformers architecture")
                return "mistral"
            return "qwen2" if self.qkv_bias else "llama"
        raise ValueError("this GPTConfig mixes GPT-2 and Llama options: no transformers architecture matches it")

    def to_hf_config(self) -> dict:
        kind = self.hf_model_type
        # Written even when None: transformers' GPT2Config would otherwise default to GPT-2's
        # 50256, outside a smaller vocabulary.
        ids = {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if kind == "gpt2":
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                        n_positions=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                        n_embd=self.n_embd, n_inner=self.intermediate_size, activation_function="gelu_new",
                        layer_norm_epsilon=self.norm_eps, tie_word_embeddings=self.tie_word_embeddings,
                        resid_pdrop=self.dropout, embd_pdrop=self.dropout, attn_pdrop=self.dropout, **ids)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
        out = dict(model_type=kind, architectures=[arch], vocab_size=self.vocab_size,
                   max_position_embeddings=self.block_size, num_hidden_layers=self.n_layer,
                   num_attention_heads=self.n_head, num_key_value_heads=self.n_kv_head,
                   head_dim=self.head_dim, hidden_size=self.n_embd,
                   intermediate_size=self.intermediate_size, hidden_act="silu", rms_norm_eps=self.norm_eps,
                   rope_theta=self.rope_theta, tie_word_embeddings=self.tie_word_embeddings,
                   attention_dropout=self.dropout, **ids)
        if kind == "mistral":
            out["sliding_window"] = self.sliding_window
        if kind == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        return out


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


GPT_PRESETS = {  # keyword arguments of GPTConfig (derived fields, e.g. head_dim, follow overrides)
    # Tests and the CPU demo.
    "gpt-tiny": dict(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_embd=64),
    # nanoGPT's "baby GPT" shape (6 layers, 6 heads, 384 wide, context 256) with a
    # BPE-sized vocabulary: the CPU benchmark's model.
    "gpt-6l-384": dict(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "llama-tiny": dict(vocab_size=512, block_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       intermediate_size=176, position="rope", norm="rmsnorm", mlp="swiglu",
                       bias=False, tie_word_embeddings=False, norm_eps=1e-6),
}
GPTConfig.PRESETS = GPT_PRESETS  # every family's config class lists its presets as PRESETS


# ------------------------------------------------------------------ layers --

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm") and x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(norm) is nn.LayerNorm:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(x)


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class AttentionLayout:
    """How the tokens of one forward are laid out, shared by every layer.

    Either dense (x is (batch, seqlen, C), plain causal attention) or packed
    (x is (total, C)): cu_seqlens_q / cu_seqlens_k describe the sequences for
    flash_attention_varlen, and with a cache `write_index` says where each new
    token's k / v go in the flat cache.
    """

    def __init__(self, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                 write_index=None):
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k
        self.write_index = write_index

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.qkv_bias
        self.q_size, self.kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        # One matmul for q, k and v: [q | k | v] along the output features.
        self.c_attn = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.c_proj = nn.Linear(self.q_size, config.n_embd, bias=config.bias)
        self.window = (config.sliding_window - 1, 0) if config.sliding_window else (-1, -1)
        self.dropout = config.dropout

    def forward(self, x, rope, layout: AttentionLayout, cache: "KVCache | None" = None):
        lead = x.shape[:-1]  # (batch, seqlen) or (total,)
        q, k, v = self.c_attn(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(*lead, self.n_head, self.head_dim)
        k = k.view(*lead, self.n_kv_head, self.head_dim)
        v = v.view(*lead, self.n_kv_head, self.head_dim)
        if rope is not None:
            cos, sin = rope
            # In x's dtype, as transformers' Llama does (bit-equal in bf16).
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if not layout.packed:
            y = flash_attention(q, k, v, causal=True, window=self.window)
        else:
            if cache is not None:
                k, v = cache.store(self.layer_idx, k, v, layout.write_index)
            y = flash_attention_varlen(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
                                       layout.max_seqlen_q, layout.max_seqlen_k, causal=True, window=self.window)
        y = self.c_proj(y.reshape(*lead, self.q_size))
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.intermediate_size
        # SwiGLU's gate and up projections are one matmul: [gate | up].
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = gelu_tanh(h)  # GPT-2's gelu_new, one fused op (llmkit's CPU kernel, ~5x ATen's)
        h = self.c_proj(h)
        return F.dropout(h, self.dropout, self.training) if self.dropout else h


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, layout, cache=None):
        x = x + self.attn(self.ln_1(x), rope, layout, cache)
        return x + self.mlp(self.ln_2(x))


# ------------------------------------------------------------------ cache --

class KVCache:
    """Preallocated keys and values of every layer for a batch of sequences.

    Sequence b owns rows ``[b * max_len, (b + 1) * max_len)`` of the flat
    per-layer tensors (batch * max_len, n_kv_head, head_dim); its first
    ``lengths[b]`` rows are filled. Attention over the cache is one
    flash_attention_varlen call: each sequence's filled rows are one varlen
    sequence and the unfilled tail of its slot an empty-query filler
    sequence, so no padding is ever attended and nothing is copied.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        if max_len < 1 or batch < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
        if config.position == "learned" and max_len > config.block_size:
            raise ValueError(f"max_len {max_len} exceeds the model's position table (block_size = {config.block_size})")
        self.batch, self.max_len = batch, max_len
        shape = (batch * max_len, config.n_kv_head, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = [0] * batch  # filled rows per sequence

    def store(self, layer_idx: int, k, v, write_index):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(0, write_index, k.to(keys.dtype))
        values.index_copy_(0, write_index, v.to(values.dtype))
        return keys, values

    def plan(self, new_lengths, device) -> tuple[AttentionLayout, torch.Tensor]:
        """Layout for appending new_lengths[b] tokens to sequence b (0 = inactive), and their positions.

        Plain Python on a handful of ints: this runs once per decode step, where
        a dozen tiny tensor ops would cost more than the attention itself."""
        new = [int(n) for n in new_lengths]
        old = self.lengths
        total = [a + b for a, b in zip(old, new)]
        if max(total) > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens per sequence; {max(total)} would not fit")
        cu_q, cu_k, positions, write_index = [0], [], [], []
        for b, (n, before, after) in enumerate(zip(new, old, total)):
            start = b * self.max_len
            cu_q += [cu_q[-1] + n, cu_q[-1] + n]  # the filler after each sequence has no queries
            cu_k += [start, start + after]
            positions += range(before, after)
            write_index += range(start + before, start + after)
        cu_k.append(self.batch * self.max_len)
        max_k = max(max(t for t, n in zip(total, new) if n) if any(new) else 0, self.max_len - min(total))
        layout = AttentionLayout(torch.tensor(cu_q, dtype=torch.int32, device=device),
                                 torch.tensor(cu_k, dtype=torch.int32, device=device),
                                 max(new), max_k, torch.tensor(write_index, device=device))
        self.lengths = total
        return layout, torch.tensor(positions, device=device)


# ------------------------------------------------------------------ model --

class GPT(PretrainedIO, nn.Module):
    """Decoder-only language model; see the module docstring."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=_norm(config),
        ))
        if config.position == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
            self.rotary = None
        else:
            self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        self._checkpoint_kwargs = {"use_reentrant": False}
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: std 0.02 / sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT":
        return cls(GPTConfig.preset(name, **overrides))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in the backward pass instead of
        keeping them (transformers' name): less memory for one more forward.
        Applies to training forwards with grad enabled; cached decoding is
        untouched. ``gradient_checkpointing_kwargs`` go to
        torch.utils.checkpoint.checkpoint (default use_reentrant=False)."""
        self._checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self, exclude_positions: bool = False) -> int:
        n = count_parameters(self)
        if exclude_positions and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def __repr__(self):
        return f"{super().__repr__()}\n# parameters: {format_count(self.num_parameters())}"

    # ----------------------------------------------------------- forward --
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                logits_to_keep: str = "all") -> ModelOutput:
        """Logits (and the next-token loss when labels are given).

        Args:
            input_ids: (batch, seqlen); or (total,) packed with cu_seqlens.
            labels: like input_ids; position t is scored on predicting
                labels[t + 1] (transformers' convention: pass labels=input_ids),
                -100 is ignored, and nothing is predicted across sequences.
            attention_mask: (batch, seqlen), 1 for real tokens (left or right
                padding): run padding-free; padded positions get logits 0.
            cu_seqlens: int32 (batch + 1) offsets of packed sequences.
            position_ids: positions of the (batch, seqlen) tokens; default
                0..seqlen-1 (restarting per sequence when packed / padded).
            kv_cache: append the tokens to this cache (see KVCache; the
                batch is given as ``input_ids`` (total,) with
                ``cu_seqlens`` of the new tokens per cached sequence).
            logits_to_keep: "all"; "last" (the last token of each
                sequence, what generation needs; returns (batch, vocab)); or
                "none" with labels: the loss only, through the fused LM head +
                cross-entropy (llmkit.nn.loss.linear_cross_entropy), which
                never writes the (tokens, vocab) logits: the training path.
        """
        config = self.config
        check_input_ids(input_ids, config.vocab_size)
        padded_shape = None
        if kv_cache is not None:
            if cu_seqlens is None:
                raise ValueError("with kv_cache, pass the new tokens packed: input_ids (total,) and cu_seqlens")
            if labels is not None or attention_mask is not None:
                raise ValueError("kv_cache is for inference: labels and attention_mask are not taken with it")
            new_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
            if new_lengths.numel() != kv_cache.batch or int(cu_seqlens[-1]) != input_ids.shape[0] \
                    or (new_lengths < 0).any():
                raise ValueError(f"cu_seqlens must give the new tokens of each of the cache's {kv_cache.batch} "
                                 f"sequences and add up to the {input_ids.shape[0]} tokens of input_ids")
            layout, positions = kv_cache.plan(new_lengths, input_ids.device)
            last_index = None
        elif attention_mask is not None or cu_seqlens is not None:
            if attention_mask is not None:
                if attention_mask.shape != input_ids.shape or input_ids.dim() != 2:
                    raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                     f"(batch, seqlen) {tuple(input_ids.shape)}")
                padded_shape = input_ids.shape
                indices, cu_seqlens, _ = unpad(attention_mask)
                input_ids = input_ids.flatten()[indices]
                if labels is not None:
                    labels = labels.flatten()[indices]
            elif input_ids.dim() != 1:
                raise ValueError("with cu_seqlens, input_ids must be packed 1-D (total,)")
            cu_seqlens = cu_seqlens.to(input_ids.device, torch.int32)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            if int(cu_seqlens[-1]) != input_ids.shape[0] or int(cu_seqlens[0]) != 0 or (lengths < 0).any():
                raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens ({input_ids.shape[0]})")
            max_len = int(lengths.max())
            layout = AttentionLayout(cu_seqlens, cu_seqlens, max_len, max_len)
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
            positions = torch.arange(input_ids.shape[0], device=input_ids.device) - starts
            last_index = cu_seqlens[1:].long() - 1
        else:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)} "
                                 "(pass cu_seqlens for packed 1-D input)")
            layout = AttentionLayout()
            positions = position_ids if position_ids is not None else torch.arange(input_ids.shape[1],
                                                                                   device=input_ids.device)
            last_index = None
        max_position = int(positions.max()) + 1 if positions.numel() else 0
        if config.position == "learned":
            check_length(max_position, config.block_size)

        tok = self.transformer.wte(input_ids)
        if config.position == "learned":
            x = tok + self.transformer.wpe(positions)
            rope = None
        else:
            x = tok
            cos, sin = self.rotary(positions if positions.dim() == 2 else positions[None])
            # Broadcast over heads: (batch, seqlen, 1, d) dense, (total, 1, d) packed.
            rope = (cos[0, :, None], sin[0, :, None]) if layout.packed else (cos[:, :, None], sin[:, :, None])
        if config.dropout and self.training:
            x = F.dropout(x, config.dropout)
        if kv_cache is not None and not torch.is_grad_enabled() and self._plain_modules():
            x = self._decode_blocks(x, rope, layout, kv_cache)
        elif self.gradient_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled():
            for block in self.transformer.h:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layout, None, **self._checkpoint_kwargs)
        else:
            for block in self.transformer.h:
                x = block(x, rope, layout, kv_cache)
        x = self.transformer.ln_f(x)

        if logits_to_keep not in ("all", "last", "none"):
            raise ValueError(f'logits_to_keep must be "all", "last" or "none", got {logits_to_keep!r}')
        if logits_to_keep == "last":
            if kv_cache is not None:
                ends = torch.cumsum(new_lengths, 0) - 1
                x = x[ends[new_lengths > 0].to(x.device)]
            elif layout.packed:
                x = x[last_index]
            else:
                x = x[:, -1]
            if kv_cache is not None and not torch.is_grad_enabled() and type(self.lm_head) is nn.Linear:
                return ModelOutput(logits=decode_linear(x, self.lm_head.weight), last_hidden_state=x)
            return ModelOutput(logits=self.lm_head(x), last_hidden_state=x)
        if labels is not None and labels.shape != x.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(x.shape[:-1])}")
        if logits_to_keep == "none":
            if labels is None:
                raise ValueError('logits_to_keep="none" is for training: pass labels')
            # The fused LM head + loss: no (tokens, vocab) logits tensor at all.
            targets = self._next_token_targets(labels, layout)
            loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
            return ModelOutput(logits=None, loss=loss, last_hidden_state=x)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            targets = self._next_token_targets(labels, layout)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
        if padded_shape is not None:
            full = logits.new_zeros(padded_shape[0] * padded_shape[1], logits.shape[-1])
            full[indices] = logits
            logits = full.view(*padded_shape, -1)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=x)

    _PLAIN = (nn.Linear, nn.LayerNorm, RMSNorm)

    def _plain_modules(self) -> bool:
        """Every layer of the blocks is a plain Linear / norm (no LoRA adapter, no
        quantized layer), so decoding may call their weights directly."""
        return all(type(m) in self._PLAIN for block in self.transformer.h
                   for m in (block.ln_1, block.ln_2, block.attn.c_attn, block.attn.c_proj,
                             block.mlp.c_fc, block.mlp.c_proj))

    def _decode_blocks(self, x, rope, layout, cache):
        """The blocks of a cached inference step, as plain functional calls.

        The same math as Block.forward; a decode step moves one token per
        sequence, so module calls and argument checks would cost about as
        much as the GEMVs themselves (measured: 1.8 ms of overhead a step for
        6 layers), and the GEMVs go to llmkit's multi-threaded kernel
        (ops.decode_linear: ~2x MKL's weight-read bandwidth on 2 cores).
        Only taken when every layer is plain (_plain_modules).
        """
        flash_forward = torch.ops.llmkit.flash_attention_forward
        for i, block in enumerate(self.transformer.h):
            attn, mlp = block.attn, block.mlp
            lead = x.shape[:-1]
            h = _apply_norm(block.ln_1, x)
            q, k, v = decode_linear(h, attn.c_attn.weight, attn.c_attn.bias).split(
                [attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q = q.view(*lead, attn.n_head, attn.head_dim)
            k = k.view(*lead, attn.n_kv_head, attn.head_dim)
            v = v.view(*lead, attn.n_kv_head, attn.head_dim)
            if rope is not None:
                cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            keys, values = cache.store(i, k, v, layout.write_index)
            y, _ = flash_forward(q, keys, values, layout.cu_seqlens_q, layout.cu_seqlens_k,
                                 layout.max_seqlen_q, layout.max_seqlen_k, attn.head_dim ** -0.5,
                                 attn.window[0], 0, None)
            x = x + decode_linear(y.view(*lead, attn.q_size), attn.c_proj.weight, attn.c_proj.bias)
            h = decode_linear(_apply_norm(block.ln_2, x), mlp.c_fc.weight, mlp.c_fc.bias)
            if mlp.swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = gelu_tanh(h)
            x = x + decode_linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        return x

    @staticmethod
    def _next_token_targets(labels, layout):
        """Position t is scored on labels[t + 1]; -100 where there is no next token."""
        if not layout.packed:
            # Shift the labels, not the logits: slicing (batch, seqlen, vocab) would copy it.
            return F.pad(labels[:, 1:], (0, 1), value=-100)
        # Shift within each sequence: a sequence's last token predicts nothing.
        targets = torch.roll(labels, -1).clone()
        targets[layout.cu_seqlens_q[1:].long() - 1] = -100
        return targets

    # ------------------------------------------------------ Hugging Face --
    # from_pretrained(path_or_hf_model, dtype=None, device=None, **config_overrides) and
    # save_pretrained(directory, tokenizer=None, ...) come from PretrainedIO (hf_io.py);
    # from_hf / to_hf are their older names.

    @classmethod
    def _from_hf_parts(cls, hf_config: dict, state: dict, overrides: dict) -> "GPT":
        """A GPT with the weights of a transformers GPT2LMHeadModel / LlamaForCausalLM /
        MistralForCausalLM / Qwen2ForCausalLM checkpoint (keys checked both ways)."""
        config = apply_overrides(GPTConfig.from_hf_config(hf_config), overrides, "GPT.from_pretrained")
        model = cls(config)
        hf = {_normalized_hf_name(k): v for k, v in state.items()}
        # Messages name tensors as the checkpoint (or, for missing ones, transformers) spells them.
        needed = _state_to_hf(config, model.state_dict())  # the names transformers gives our weights
        shown = {_normalized_hf_name(k): k for k in needed}
        shown.update({_normalized_hf_name(k): k for k in state})
        expected = set(shown) & {_normalized_hf_name(k) for k in needed}
        bodies = {k.split(".")[0] for k in expected}
        check_keys("GPT.from_pretrained", expected, hf, benign=_BENIGN_HF_KEYS + (
            (r"^lm_head\.weight$",) if config.tie_word_embeddings else ()),
            in_body=lambda k: k.split(".")[0] in bodies, shown_as=shown,
            config_hint=f"{config.hf_model_type}, n_layer={config.n_layer}, n_embd={config.n_embd}, "
                        f"vocab_size={config.vocab_size}")
        assign_weights(model, _state_from_hf(config, hf), "GPT.from_pretrained")
        return model

    def _to_hf_parts(self) -> tuple[dict, dict]:
        return self.config.to_hf_config(), _state_to_hf(self.config, self.state_dict())


# ---------------------------------------------- checkpoint name mapping --

# Checkpoint names transformers ignores too: GPT-2's causal-mask buffers (saved by
# transformers < 4.3x), RoPE's inverse frequencies (older Llama checkpoints).
_BENIGN_HF_KEYS = (r"(^|\.)attn\.(bias|masked_bias)$", r"rotary_emb\.inv_freq$")


def _normalized_hf_name(name: str) -> str:
    """GPT2LMHeadModel keeps the body under ``transformer.``, LlamaForCausalLM under ``model.``,
    the bare GPT2Model / LlamaModel under nothing: one name for all three."""
    if name.startswith("lm_head."):
        return name
    return name.removeprefix("model.").removeprefix("transformer.")


def _state_from_hf(config: GPTConfig, hf: dict) -> dict:
    """Our state dict from checkpoint tensors under normalized names (see _normalized_hf_name)."""
    out = {}
    if config.hf_model_type == "gpt2":
        out["transformer.wte.weight"] = hf["wte.weight"]
        out["transformer.wpe.weight"] = hf["wpe.weight"]
        for i in range(config.n_layer):
            p = f"h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[f"transformer.{p}{ln}.weight"] = hf[p + ln + ".weight"]
                out[f"transformer.{p}{ln}.bias"] = hf[p + ln + ".bias"]
            # GPT-2's Conv1D stores (in, out): transpose to Linear's (out, in).
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out[f"transformer.{p}{name}.weight"] = hf[f"{p}{name}.weight"].t()
                out[f"transformer.{p}{name}.bias"] = hf[f"{p}{name}.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = hf["ln_f.weight"], hf["ln_f.bias"]
    else:
        out["transformer.wte.weight"] = hf["embed_tokens.weight"]
        for i in range(config.n_layer):
            p = f"layers.{i}."
            q = f"transformer.h.{i}."
            out[q + "ln_1.weight"] = hf[p + "input_layernorm.weight"]
            out[q + "ln_2.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[q + "attn.c_attn.weight"] = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            if config.qkv_bias:
                out[q + "attn.c_attn.bias"] = torch.cat([hf[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            out[q + "attn.c_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
            out[q + "mlp.c_fc.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
            out[q + "mlp.c_proj.weight"] = hf[p + "mlp.down_proj.weight"]
        out["transformer.ln_f.weight"] = hf["norm.weight"]
    # Tied: the head is the embedding (a saved lm_head copy is ignored, as transformers does).
    out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_word_embeddings else hf["lm_head.weight"]
    return out


def _state_to_hf(config: GPTConfig, state: dict) -> dict:
    out = {}
    if config.hf_model_type == "gpt2":
        out["transformer.wte.weight"] = state["transformer.wte.weight"]
        out["transformer.wpe.weight"] = state["transformer.wpe.weight"]
        for i in range(config.n_layer):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[f"{p}{ln}.weight"], out[f"{p}{ln}.bias"] = state[f"{p}{ln}.weight"], state[f"{p}{ln}.bias"]
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out[f"{p}{name}.weight"] = state[f"{p}{name}.weight"].t()
                out[f"{p}{name}.bias"] = state[f"{p}{name}.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = (state["transformer.ln_f.weight"],
                                                                        state["transformer.ln_f.bias"])
    else:
        q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        out["model.embed_tokens.weight"] = state["transformer.wte.weight"]
        for i in range(config.n_layer):
            p, q = f"model.layers.{i}.", f"transformer.h.{i}."
            out[p + "input_layernorm.weight"] = state[q + "ln_1.weight"]
            out[p + "post_attention_layernorm.weight"] = state[q + "ln_2.weight"]
            for name, part in zip("qkv", state[q + "attn.c_attn.weight"].split([q_size, kv_size, kv_size])):
                out[p + f"self_attn.{name}_proj.weight"] = part
            if q + "attn.c_attn.bias" in state:
                for name, part in zip("qkv", state[q + "attn.c_attn.bias"].split([q_size, kv_size, kv_size])):
                    out[p + f"self_attn.{name}_proj.bias"] = part
            out[p + "self_attn.o_proj.weight"] = state[q + "attn.c_proj.weight"]
            gate, up = state[q + "mlp.c_fc.weight"].chunk(2)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = state[q + "mlp.c_proj.weight"]
        out["model.norm.weight"] = state["transformer.ln_f.weight"]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out
