"""Multi-head attention layer on llmkit's flash kernel.

Llama-style: separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``
linears (the names of transformers' ``LlamaAttention``, so its state_dict
loads as is), grouped-query attention, optional RoPE in HF's rotate-half
convention, causal masks, sliding windows and Longformer global tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import flash_attention
from .rope import RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    """Self- or cross-attention: ``y = o_proj(attention(q_proj(x), k_proj(c), v_proj(c)))``.

    Args:
        embed_dim: model width (input and output features).
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA / MQA); must divide num_heads.
            Defaults to num_heads.
        head_dim: per-head width; defaults to embed_dim // num_heads. A
            multiple of 8, at most 256 (the kernel's limit).
        bias: bias in the q/k/v projections (Qwen2 has them; Llama does not).
            o_proj never has a bias.
        causal: mask future keys (bottom-right aligned, flash-attn's convention).
        window: (left, right) sliding window, -1 unbounded; e.g. Mistral's
            sliding_window W is ``window=(W - 1, 0)`` with ``causal=True``.
        rope: apply rotary position embeddings to q and k (self-attention only).
        rope_base: RoPE theta.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, causal: bool = False,
                 window: tuple[int, int] = (-1, -1), rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1:
            raise ValueError(f"num_heads and num_kv_heads must be >= 1, got {num_heads} and {num_kv_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads}); pass head_dim")
            head_dim = embed_dim // num_heads
        if head_dim % 8 or not 0 < head_dim <= 256:
            raise ValueError(f"head_dim must be a multiple of 8 up to 256 (the kernel's limit), got {head_dim}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal = causal
        self.window = tuple(window)
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                global_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from `x` (batch, seqlen, embed_dim).

        Args:
            context: (batch, seqlen_kv, embed_dim) keys/values source for
                cross-attention; defaults to x (self-attention).
            position_ids: int (batch, seqlen) or (seqlen,) RoPE positions;
                default 0..seqlen-1. Ignored without rope.
            global_tokens: bool (batch, seqlen), Longformer global attention
                (self-attention, not causal).

        Returns:
            (batch, seqlen, embed_dim).
        """
        batch, seqlen, _ = x.shape
        source = x if context is None else context
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(source).view(batch, source.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(source).view(batch, source.shape[1], self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            if context is not None:
                raise ValueError("rope=True is for self-attention: "
                                 "the positions of a cross-attention context are undefined")
            if position_ids is None:
                position_ids = torch.arange(seqlen, device=x.device)
            cos, sin = self.rotary(position_ids)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = flash_attention(q, k, v, causal=self.causal, window=self.window, global_tokens=global_tokens)
        return self.o_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, window={self.window}")
