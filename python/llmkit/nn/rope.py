"""Rotary position embeddings (RoPE) in Hugging Face Llama's convention.

"Rotate half": the first and second halves of head_dim form the rotated
pairs (``apply_rotary_pos_emb`` in transformers' Llama), not interleaved
even/odd pairs (the original RoFormer / GPT-J layout). Using the same
convention means q_proj / k_proj weights of HF checkpoints port over as they
are. cos / sin are computed in float32 from the positions on every call:
cheap next to attention, and no cache length to outgrow.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (batch, seqlen, heads, head_dim) by cos / sin (batch, seqlen, head_dim).

    cos / sin are cast to x's dtype first and the rotation runs in that dtype,
    exactly as transformers' Llama does, so bf16 models match HF bit for bit."""
    cos = cos.to(x.dtype)[:, :, None, :]
    sin = sin.to(x.dtype)[:, :, None, :]
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos / sin of RoPE for given positions: ``cos, sin = rope(position_ids)``.

    Args:
        head_dim: rotated dimension (even); the whole head is rotated.
        base: theta of the frequencies ``base ** (-2i / head_dim)`` (10000 in
            Llama 1/2, 500000 in Llama 3 without its frequency scaling).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        # Not persistent: derived from (head_dim, base), so not part of a checkpoint.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: int (batch, seqlen) or (seqlen,) -> cos, sin float32 (batch, seqlen, head_dim)."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        freqs = position_ids.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
