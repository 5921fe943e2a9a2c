"""Pieces every model family shares: the output record, input checks,
padding <-> padding-free (varlen) conversion and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What a model's forward returns.

    logits: (batch, seqlen, vocab) or (total_tokens, vocab) for packed input;
    loss: mean cross-entropy over labelled positions when labels were given;
    last_hidden_state: the final hidden states (after the final norm);
    extra: family-specific outputs (pooler_output, nsp_logits, ...).
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise a clear error for ids an embedding lookup would crash on."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"{name} is empty: give at least one token")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_length(seqlen: int, max_positions: int | None, what: str = "sequence") -> None:
    if max_positions is not None and seqlen > max_positions:
        raise ValueError(f"{what} length {seqlen} exceeds the model's position table "
                         f"(max_position_embeddings = {max_positions})")


def unpad(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(indices, cu_seqlens, max_seqlen) of the real tokens of a padded batch.

    attention_mask: (batch, seqlen), 1/True for real tokens (any padding side,
    but each row's real tokens are taken in order). ``x.flatten(0, 1)[indices]``
    packs a (batch, seqlen, ...) tensor; cu_seqlens is int32 (batch + 1).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = mask.flatten().nonzero(as_tuple=False).flatten()
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of packing with :func:`unpad`'s indices; padded slots are 0."""
    out = packed.new_zeros((batch * seqlen,) + tuple(packed.shape[1:]))
    out[indices] = packed
    return out.view((batch, seqlen) + tuple(packed.shape[1:]))


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
