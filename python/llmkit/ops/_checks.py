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


def check_same_device(op: str, first: tuple[str, torch.Tensor], *others: tuple[str, object]) -> None:
    """Every tensor in `others` (name, tensor or None) is on `first`'s device.

    Called by the fake (meta) kernels as well as the wrappers: one meta tensor
    among CPU ones sends the dispatcher to the Meta kernel, which would hand
    back an uninitialised tensor on the CPU instead of failing."""
    name0, t0 = first
    for name, t in others:
        if isinstance(t, torch.Tensor) and t.device != t0.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {name0} is on {t0.device}; "
                             "all tensor arguments must be on one device")
