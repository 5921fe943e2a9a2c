"""Run metrics: a JSONL log, a loss-curve PNG, and model FLOPs utilisation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Dense peak TFLOPS of GPUs we know (bf16/fp16 tensor cores; fp32 = TF32 where that is the default).
_GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "V100": 125.0, "T4": 65.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """Peak TFLOPS of the device for MFU: a table for GPUs; for CPUs
    cores x clock x FLOPs/cycle of its widest FMA (AVX-512: 64 fp32,
    AVX2: 32 per core), an estimate. None when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return value if dtype != "fp32" else value / 2
        return None
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    per_cycle = 64 if " avx512f" in flags else 32 if " avx2" in flags else 8
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if not mhz:
        return None
    cores = torch.get_num_threads()
    return cores * (sum(mhz) / len(mhz)) * 1e6 * per_cycle / 1e12


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 N (forward + backward of the weights) + 12 L d T (attention scores
    and values), PaLM's appendix B / nanoGPT's estimate; N excludes position
    tables. Encoder-decoders count both stacks through N."""
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name and "position" not in name)
    config = getattr(model, "config", None)
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None) \
        or getattr(config, "num_layers", 0)
    width = getattr(config, "n_embd", None) or getattr(config, "hidden_size", None) \
        or getattr(config, "d_model", 0)
    return 6.0 * n + 12.0 * layers * width * seq_len


class MetricsLog:
    """Appends one JSON object a line; on resume drops lines past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss_curve(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Training loss (and validation loss) against step, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
