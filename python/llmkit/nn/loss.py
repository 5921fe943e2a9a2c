"""LM head + cross-entropy with the softmax gradient fused into the loss.

``F.cross_entropy(x @ W.T, targets)`` makes about eight passes over the
(tokens, vocab) logits — the largest activation of a language model (67 MB
for 2048 tokens x 8192 words in fp32, 400 MB at GPT-2's 50257) — and
allocates three more of it: log-probabilities, the zero-filled gradient of
nll_loss, the gradient of log_softmax. :func:`linear_cross_entropy` computes
the logits with one matmul, then the kernel
``torch.ops.llmkit.cross_entropy_fused_`` turns them, row by row in cache,
into the loss and (in place) the gradient ``(softmax - onehot) / count``; the
backward is the two matmuls of the LM head on that gradient. Same FLOPs, one
(tokens, vocab) buffer, three passes over it.
"""

from __future__ import annotations

import torch

from ..ops.loss import cross_entropy_fused_


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T, targets, ignore_index=...)``: the mean over
    the targets that are not ignore_index (nan when there is none).

    Args:
        x: (tokens, features) hidden states, any float dtype; the matmuls run
            in x's dtype (or the autocast dtype in an autocast region), the
            softmax in float32.
        weight: (vocab, features), the LM head (tied embeddings welcome).
        targets: (tokens,) int64 class ids or ignore_index.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (tokens, features) and weight (vocab, features) must agree, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"targets must be ({x.shape[0]},), got {tuple(targets.shape)}")
    device_type = x.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return _LinearCrossEntropy.apply(x, weight, targets.long(), int(ignore_index), compute_dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, compute_dtype):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        count = int((targets != ignore_index).sum())
        with torch.autocast(device_type=x.device.type, enabled=False):
            xs, w = x.to(compute_dtype), weight.to(compute_dtype)
            logits = (xs @ w.t()).float().contiguous()
            # logits becomes d(loss)/d(logits) = (softmax - onehot) / count, in place.
            losses = cross_entropy_fused_(logits, targets, ignore_index, 1.0 / max(count, 1), need_grad)
        if need_grad:
            ctx.save_for_backward(xs, w, logits)
        ctx.dtypes = (x.dtype, weight.dtype)
        loss = losses.sum().to(torch.promote_types(x.dtype, torch.float32))  # float64 in, float64 out
        return loss / count if count else loss * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        xs, w, grad_logits = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g = grad_logits.to(xs.dtype)
        grad_x = grad_w = None
        # Scale the (tokens, features) and (vocab, features) results, not the (tokens, vocab) gradient.
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w).mul_(grad_loss.to(xs.dtype)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ xs).mul_(grad_loss.to(xs.dtype)).to(w_dtype)
        return grad_x, grad_w, None, None, None
