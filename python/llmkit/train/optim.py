"""AdamW with GPT-style parameter groups, and the warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the matrices of linear layers: no weight decay on norms,
    biases or embeddings (and so not on a head tied to the embedding), as
    BERT, GPT-2/3 and nanoGPT train. Parameters are named so optimizer state
    can be saved by name."""
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORMS) or type(module).__name__.endswith(("Norm", "LayerNorm"))
        for name, p in module.named_parameters(recurse=False):
            if is_norm or isinstance(module, nn.Embedding) or name.endswith("bias") or p.dim() < 2:
                no_decay.add(id(p))
    decay_params, other_params, seen = [], [], set()
    for _, p in model.named_parameters():  # named_parameters drops tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (other_params if id(p) in no_decay else decay_params).append(p)
    return [{"params": decay_params, "weight_decay": weight_decay},
            {"params": other_params, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where this torch has it for the device."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=device_type != "cpu")


class WarmupCosine:
    """Learning rate at step s: linear warmup from 0 over `warmup_steps`, then
    cosine decay to `min_lr_ratio * lr` at `total_steps` (then held)."""

    def __init__(self, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
        self.lr, self.warmup_steps, self.total_steps, self.min_lr_ratio = lr, warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)

    def state_dict(self) -> dict:
        return dict(lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                    min_lr_ratio=self.min_lr_ratio)

    def load_state_dict(self, state: dict) -> None:
        for key in ("lr", "warmup_steps", "total_steps", "min_lr_ratio"):
            setattr(self, key, state[key])
