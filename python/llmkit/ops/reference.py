"""Pure-PyTorch references of every llmkit op: slow, obvious, and the
definition the kernels are tested against.

NF4 is a storage format whose rounding is part of the definition
(bitsandbytes' float32 arithmetic decides which code a value gets), so the
quantizer references compute in float32 exactly as the format says; the tests
check the float64 properties (error bounds) on top.
"""

from __future__ import annotations

import torch

from .quant_state import NF4_CODES, NestedState, NF4State, cached_dynamic_map

_MIN_ABSMAX = 1e-38


def _nf4_midpoints(device) -> torch.Tensor:
    code = torch.tensor(NF4_CODES, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """Reference of :func:`llmkit.ops.quantize_nf4` (same signature and result)."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal; the partial last block divides by
    # its clamped absmax and stores the clamped value (bitsandbytes' rounding).
    scaled = (blocks * (1.0 / absmax.clamp(min=_MIN_ABSMAX))[:, None]).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=_MIN_ABSMAX)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    scaled = scaled.clamp(-1, 1)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pad nibble: code of 0.0
    codes = torch.bucketize(scaled, _nf4_midpoints(w.device)).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        code = cached_dynamic_map(w.device)
        q, absmax2 = quantize_blockwise_8bit(absmax - offset, code, 256)
        state.absmax, state.offset = q, offset
        state.state2 = NestedState(absmax=absmax2, code=code, blocksize=256)
    return packed, state


def block_absmax(state: NF4State) -> torch.Tensor:
    """The float32 absmax per block, decoding double quant (code2[q] * absmax2 + offset)."""
    if state.state2 is None:
        return state.absmax.float()
    s2 = state.state2
    nested_scale = s2.absmax.repeat_interleave(s2.blocksize)[: state.absmax.numel()]
    return s2.code[state.absmax.long()] * nested_scale + state.offset


def dequantize_nf4(packed: torch.Tensor, state: NF4State, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of :func:`llmkit.ops.dequantize_nf4`."""
    n = state.shape.numel()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    values = torch.tensor(NF4_CODES, dtype=torch.float32, device=packed.device)[codes]
    scale = block_absmax(state).repeat_interleave(state.blocksize)[:n]
    return (values * scale).reshape(state.shape).to(out_dtype or state.dtype)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """Reference of ``torch.ops.llmkit.quantize_blockwise_8bit`` (bitsandbytes'
    CPU rounding): v = x * (1 / absmax) goes to grid point
    j = trunc(((clamp(v) + 1) * 0.5) * 65535 + 0.5), and grid point j takes the
    code whose midpoint interval holds -1 + 2j / 65535. An all-zero block gets code 0."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.cat([flat, flat.new_zeros(blocks * blocksize - n)]).reshape(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    v = (padded * (1.0 / absmax)[:, None]).clamp(-1, 1)
    j = ((((v + 1.0) * 0.5) * 65535.0) + 0.5).nan_to_num(0.0).to(torch.int64)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=x.device)) / 65535.0
    mids = 0.5 * (code[:-1] + code[1:])
    table = torch.searchsorted(mids, grid)  # midpoints strictly below each grid point
    q = torch.where(absmax[:, None] > 0, table[j], torch.zeros_like(j))
    return q.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax
