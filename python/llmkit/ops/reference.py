"""Pure-PyTorch references of every llmkit op: slow, obvious, and the
definition the kernels are tested against.

NF4 is a storage format whose rounding is part of the definition
(bitsandbytes' float32 arithmetic decides which code a value gets), so the
quantizer references compute in float32 exactly as the format says; the tests
check the float64 properties (error bounds) on top.
"""

from __future__ import annotations

import math

import torch

from .quant_state import NF4_CODES, NestedState, NF4State, cached_dynamic_map

_MIN_ABSMAX = 1e-38


def _nf4_midpoints(device) -> torch.Tensor:
    code = torch.tensor(NF4_CODES, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """Reference of :func:`llmkit.ops.quantize_nf4` (same result). NaN / inf
    as bitsandbytes: amax and clamp propagate NaN, bucketize sends NaN to 15."""
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
    code whose midpoint interval holds -1 + 2j / 65535. An all-zero block gets code 0.
    NaN as bitsandbytes' CPU kernel: absmax skips it (0 for an all-NaN block)
    and a NaN v goes to grid point 0."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.cat([flat, flat.new_zeros(blocks * blocksize - n)]).reshape(blocks, blocksize)
    absmax = padded.abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(dim=1)
    v = (padded * (1.0 / absmax)[:, None]).clamp(-1, 1)
    j = ((((v + 1.0) * 0.5) * 65535.0) + 0.5).nan_to_num(0.0).to(torch.int64)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=x.device)) / 65535.0
    mids = 0.5 * (code[:-1] + code[1:])
    table = torch.searchsorted(mids, grid)  # midpoints strictly below each grid point
    q = torch.where(absmax[:, None] > 0, table[j], torch.zeros_like(j))
    return q.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax


# ---------------------------------------------------------------- attention --

def attention_mask(seqlen_q: int, seqlen_k: int, window: tuple[int, int] = (-1, -1),
                   global_tokens: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Which keys each query sees, as a bool (seqlen_q, seqlen_k) matrix.

    flash-attn's convention: query i sees keys
    ``[i + sk - sq - left, i + sk - sq + right]`` (-1 = unbounded; causal is
    right = 0, bottom-right aligned). ``global_tokens`` (bool, seqlen, needs
    sq == sk) adds Longformer's symmetric global attention: a global token sees
    every key and every query sees it.
    """
    left, right = window
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    if global_tokens is not None:
        g = global_tokens.to(device=device, dtype=torch.bool)
        mask |= g[:, None] | g[None, :]
    return mask


def _attention_one(q, k, v, scale, window, global_tokens, bias=None):
    """q (sq, hq, d), k/v (sk, hk, d), bias None or (hq or 1, sq, sk)
    -> out (sq, hq, d), lse (hq, sq); float64."""
    sq, hq, _ = q.shape
    sk, hk, _ = k.shape
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    if bias is not None:
        scores = scores + bias
    mask = attention_mask(sq, sk, window, global_tokens, device=q.device)
    # A -inf score (bias) hides the key like a mask; a NaN one stays visible,
    # so it makes the row's lse and output NaN, as softmax does.
    mask = mask & (scores != float("-inf"))
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a query without keys
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(scores.dtype).min))
    probs = torch.where(mask, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    out = torch.einsum("hij,jhd->ihd", probs, v)
    return out, lse


def flash_attention(q, k, v, causal: bool = False, window: tuple[int, int] = (-1, -1),
                    softmax_scale: float | None = None, global_tokens: torch.Tensor | None = None,
                    return_lse: bool = False, attn_bias: torch.Tensor | None = None):
    """Reference of :func:`llmkit.ops.flash_attention`: dense, in float64.

    q (batch, sq, hq, d), k/v (batch, sk, hk, d); attn_bias (batch or 1,
    hq or 1, sq, sk) added to the scaled scores; returns out in float64 (and
    lse (batch, hq, sq)). Differentiable, so it also defines the gradients.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window
    if causal:
        right = 0
    q, k, v = (t.double() for t in (q, k, v))
    if attn_bias is not None:
        attn_bias = attn_bias.double()
    outs, lses = [], []
    for b in range(q.shape[0]):
        g = None if global_tokens is None else global_tokens[b]
        bias = None if attn_bias is None else attn_bias[b if attn_bias.shape[0] > 1 else 0]
        o, lse_b = _attention_one(q[b], k[b], v[b], scale, (left, right), g, bias)
        outs.append(o)
        lses.append(lse_b)
    if not outs:  # an empty batch
        out = q.new_zeros(q.shape[:3] + v.shape[3:])
        lse = q.new_zeros((0, q.shape[2], q.shape[1]))
    else:
        out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           causal: bool = False, window: tuple[int, int] = (-1, -1),
                           softmax_scale: float | None = None, global_tokens: torch.Tensor | None = None,
                           return_lse: bool = False):
    """Reference of :func:`llmkit.ops.flash_attention_varlen`: each packed
    sequence attended on its own, in float64. q (total_q, hq, d), k/v
    (total_k, hk, d); lse (hq, total_q)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window
    if causal:
        right = 0
    q, k, v = (t.double() for t in (q, k, v))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        g = None if global_tokens is None else global_tokens[cq[b]:cq[b + 1]]
        o, lse_b = _attention_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                  scale, (left, right), g)
        outs.append(o)
        lses.append(lse_b)
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------ NF4 matmul --


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: NF4State,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`llmkit.ops.nf4_linear`: ``x @ dequant(W).T + bias`` in float64."""
    w = dequantize_nf4(packed, state, torch.float32).double()
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return y


def nf4_linear_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """Reference of the gradient to x of :func:`llmkit.ops.nf4_linear`: ``grad_out @ dequant(W)`` in float64."""
    return grad_out.double() @ dequantize_nf4(packed, state, torch.float32).double()


# ------------------------------------------------------------------ LoRA --

def lora_dropout_keep(shape, p: float, seed: int, device=None) -> torch.Tensor:
    """The keep mask of :func:`llmkit.ops.lora_dropout` (csrc/lora/lora.h): element
    i (row-major) is kept when the top 24 bits of a 32-bit hash of (seed, i)
    (murmur3's finalizer over an affine mix) are >= floor(p * 2**24)."""
    import numpy as np

    n = int(torch.Size(shape).numel())
    seed %= 2**64
    index = np.arange(n, dtype=np.uint64)
    u32 = np.uint32
    with np.errstate(over="ignore"):
        z = (index & np.uint64(0xFFFFFFFF)).astype(u32) * u32(0x9E3779B1) + u32(seed & 0xFFFFFFFF)
        z ^= (index >> np.uint64(32)).astype(u32) * u32(0x85EBCA77) + u32(seed >> 32) * u32(0xC2B2AE3D)
        z ^= z >> u32(16)
        z *= u32(0x85EBCA6B)
        z ^= z >> u32(13)
        z *= u32(0xC2B2AE35)
        z ^= z >> u32(16)
    keep = (z >> u32(8)).astype(np.int64) >= int(p * 16777216.0)
    return torch.from_numpy(keep).reshape(shape).to(device)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Reference of :func:`llmkit.ops.lora_dropout` in float64."""
    if p == 0:
        return x.double()
    keep = lora_dropout_keep(x.shape, p, seed, x.device)
    return x.double() * keep / (1.0 - p)


def lora_linear(x, base, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Reference of :func:`llmkit.ops.lora_linear` in float64: ``base(x) +
    scaling * dropout(x) @ A.T @ B.T``; `base` is a dense weight or ``(packed, state)``."""
    if isinstance(base, torch.Tensor):
        y = x.double() @ base.double().T
        if bias is not None:
            y = y + bias.double()
    else:
        y = nf4_linear(x, base[0], base[1], bias)
    xd = lora_dropout(x, dropout_p, seed)
    return y + scaling * (xd @ lora_A.double().T) @ lora_B.double().T


# ------------------------------------------------------------ activation --

def gelu_tanh(x):
    """Reference of :func:`llmkit.ops.gelu_tanh` in float64."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


# ---------------------------------------------------------------- linear --

def linear_gemv(x, weight, bias=None):
    """Reference of :func:`llmkit.ops.linear_gemv`: F.linear in float64."""
    out = x.double() @ weight.double().t()
    return out + bias.double() if bias is not None else out


# ------------------------------------------------------------------ loss --

def cross_entropy_fused_(logits, targets, ignore_index: int = -100, grad_scale: float = 1.0,
                         compute_grad: bool = True):
    """Reference of :func:`llmkit.ops.loss.cross_entropy_fused_` in float64:
    returns (losses, gradient) instead of writing the gradient in place."""
    x = logits.double()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(x, dim=1)  # NaN with a NaN, +inf with a +inf, -inf when all are -inf
    # Ignored rows are 0 whatever they hold (torch.where: a product with the
    # mask would keep their NaN, 0 * NaN = NaN).
    losses = torch.where(valid, lse - x.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    grad = torch.softmax(x, dim=1)  # a NaN row wherever lse is not finite
    grad[torch.arange(x.shape[0]), safe] -= 1.0
    grad = torch.where(valid[:, None], grad * grad_scale, torch.zeros_like(grad))
    return losses, (grad if compute_grad else None)


# ----------------------------------------------------------------- GloVe --

def glove_cooccurrences(sentences, vocab: int, window: int, symmetric: bool = True,
                        distance_weighting: bool = True) -> torch.Tensor:
    """Reference of ``llmkit._C.glove`` counting: the dense (vocab, vocab) float64 matrix X.
    `sentences` are lists of ids; for the word at i and each earlier word at distance d
    (1..window, same sentence), X[w_i, w_{i-d}] += 1/d and, if symmetric, X[w_{i-d}, w_i] += 1/d."""
    X = torch.zeros(vocab, vocab, dtype=torch.float64)
    for sentence in sentences:
        for i, w in enumerate(sentence):
            for d in range(1, min(window, i) + 1):
                v = 1.0 / d if distance_weighting else 1.0
                X[w, sentence[i - d]] += v
                if symmetric:
                    X[sentence[i - d], w] += v
    return X


def glove_weighting(x, x_max: float = 100.0, alpha: float = 0.75):
    """GloVe's f(x) = (x / x_max)^alpha, 1 for x >= x_max."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return torch.where(x < x_max, (x / x_max) ** alpha, torch.ones_like(x))


def glove_step(W, C, gradsq_W, gradsq_C, row: int, col: int, x: float, x_max: float = 100.0, alpha: float = 0.75,
               learning_rate: float = 0.05):
    """Reference of ``llmkit._C.glove.glove_step`` in float64 (Stanford glove.c's update): returns new
    (W, C, gradsq_W, gradsq_C, cost). Rows hold the vector then the bias; with g = lr f(x) diff,
    diff = w.c + b_w + b_c - log x: w -= g c / sqrt(G_w), G_w += (g c)^2, c likewise from the old w,
    b -= g / sqrt(G_b), G_b += g^2. cost = 0.5 f(x) diff^2."""
    import math

    W, C, GW, GC = (t.double().clone() for t in (W, C, gradsq_W, gradsq_C))
    w, c = W[row].clone(), C[col].clone()
    diff = float(w[:-1] @ c[:-1] + w[-1] + c[-1]) - math.log(x)
    fx = float(glove_weighting(x, x_max, alpha))
    cost = 0.5 * fx * diff * diff
    g = learning_rate * fx * diff
    t1, t2 = g * c[:-1], g * w[:-1]
    W[row, :-1] -= t1 / GW[row, :-1].sqrt()
    C[col, :-1] -= t2 / GC[col, :-1].sqrt()
    GW[row, :-1] += t1 * t1
    GC[col, :-1] += t2 * t2
    W[row, -1] -= g / GW[row, -1].sqrt()
    C[col, -1] -= g / GC[col, -1].sqrt()
    GW[row, -1] += g * g
    GC[col, -1] += g * g
    return W, C, GW, GC, cost
