"""The flags every `llmkit` command shares, spelled once.

- ``-o/--output DIR`` (``dest="output"``): where a command writes. The older
  spellings a command had (``--out``, ``--out-dir``) stay as aliases.
- ``--device {auto,cpu,cuda,cuda:N}``: where a command computes; ``auto`` is
  CUDA when this build has CUDA kernels and a GPU is present, else the CPU.
"""

from __future__ import annotations

import argparse

__all__ = ["add_output_argument", "add_device_argument", "resolve_device"]


def add_output_argument(parser, required: bool = False, aliases: tuple[str, ...] = (), help: str | None = None,
                        default=None, metavar: str = "DIR") -> None:
    """Add ``-o/--output`` (plus `aliases`, e.g. ``("--out-dir",)``), stored as ``args.output``."""
    parser.add_argument("-o", "--output", *aliases, dest="output", required=required, default=default,
                        metavar=metavar, help=help or "output directory")


def resolve_device(name: str | None) -> str:
    """``auto`` (or None) -> ``cuda`` when usable, else ``cpu``; anything else is checked and returned."""
    import torch

    if name in (None, "auto"):
        try:
            import llmkit

            cuda_built = llmkit.build_info()["cuda"]
        except Exception:  # noqa: BLE001 - a broken build just means: no CUDA kernels
            cuda_built = False
        return "cuda" if cuda_built and torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return str(device)


def _device_type(text: str) -> str:
    try:
        return resolve_device(text) if text != "auto" else "auto"
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_argument(parser, default: str = "auto", help: str | None = None) -> None:
    """Add ``--device`` (auto, cpu, cuda, cuda:N); ``args.device`` is checked at parse time,
    ``resolve_device(args.device)`` turns ``auto`` into a device."""
    parser.add_argument("--device", type=_device_type, default=default, metavar="DEVICE",
                        help=help or "auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: %(default)s)")
