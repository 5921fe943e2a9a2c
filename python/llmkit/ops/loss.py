"""Softmax cross-entropy fused with its gradient: ``torch.ops.llmkit.cross_entropy_fused_``.

The kernel (csrc/loss/) turns each row of a float32 (tokens, vocab) logits
matrix into its loss and, in place, into ``grad_scale * (softmax - onehot)``
— the gradient of ``grad_scale * loss`` — in three in-cache passes per row.
:func:`llmkit.nn.loss.linear_cross_entropy` builds the LM-head loss on it.
"""

from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor


def cross_entropy_fused_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         grad_scale: float = 1.0, compute_grad: bool = True) -> torch.Tensor:
    """Per-row losses ``logsumexp(logits[i]) - logits[i, targets[i]]`` (float32 (tokens,),
    0 for ignored rows); with compute_grad, `logits` (float32, contiguous) is
    overwritten with ``grad_scale * (softmax(logits) - onehot(targets))``, 0 on
    ignored rows. Targets outside [0, vocab) that are not ignore_index raise.
    Non-finite logits as the float64 reference: a NaN in a row makes its loss
    and gradient row NaN; a +inf gives loss inf (NaN if the target is the
    inf) and a NaN gradient row; ignored rows stay 0 whatever they hold."""
    check_tensor("logits", logits)
    check_tensor("targets", targets, logits, "logits")
    return torch.ops.llmkit.cross_entropy_fused_(logits, targets, int(ignore_index), float(grad_scale),
                                                 bool(compute_grad))


@torch.library.register_fake("llmkit::cross_entropy_fused_")
def _cross_entropy_fused_fake(logits, targets, ignore_index, grad_scale, compute_grad):
    check_same_device("cross_entropy_fused_", ("logits", logits), ("targets", targets))
    return logits.new_empty((logits.shape[0],))
