"""Argument checks shared by the op wrappers (before a kernel sees the input)."""

from __future__ import annotations

import torch

from .. import _C


def check_tensor(name: str, t, device_of: torch.Tensor | None = None, device_of_name: str = "the input") -> None:
    """`t` is a tensor on a device llmkit's kernels run on (and on `device_of`'s device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "cuda" and not _C.built_with_cuda():
        raise RuntimeError(
            f"{name} is a CUDA tensor but this llmkit build has no CUDA kernels "
            "(llmkit.build_info()['cuda'] is False); rebuild with nvcc on PATH or CUDA_HOME set, "
            "or move the tensor to the CPU"
        )
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} is on {t.device}; llmkit's ops run on cpu and cuda")
    if device_of is not None and t.device != device_of.device:
        raise ValueError(f"{name} is on {t.device} but {device_of_name} is on {device_of.device}")
