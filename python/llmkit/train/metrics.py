"""Run metrics: a JSONL log, a loss-curve PNG, and model FLOPs utilisation.

metrics.jsonl is appended to one line per record; a kill during an append can
leave its last line torn. Readers skip lines that do not parse (with a
warning), and a resumed run rewrites the file atomically with the records up
to its step, so a torn line never stops a run. loss.png needs matplotlib (the
``plot`` extra); without it the PNG is skipped with one warning.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkit.utils import atomic_write, get_logger, optional, write_text

_log = get_logger(__name__)

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


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """(the records of a metrics.jsonl, the numbers of the lines that are not a JSON object)."""
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    return records, bad


class MetricsLog:
    """Appends one JSON object a line; on resume keeps the records up to the
    resumed step (dropping, with a warning, lines a kill tore) and rewrites
    the file atomically; a new run starts it empty."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text(self.path, "")
        elif self.path.exists():
            records, bad = read_records(self.path)
            if bad:
                _log.warning("%s: dropping %d line(s) that are not complete JSON records (line %s; a run "
                             "killed while writing)", self.path, len(bad), ", ".join(map(str, bad[:5])))
            kept = [r for r in records if _step(r) <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return read_records(self.path)[0]


def _step(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else float("inf")  # a record without a usable step is dropped


_warned_no_matplotlib = False


def plot_loss_curve(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Training loss (and validation loss) against step, as a PNG (written atomically).

    Returns None, and draws nothing, without records or without matplotlib
    (optional: ``pip install 'llmkit[plot]'``; a warning says so once).
    """
    global _warned_no_matplotlib
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and "loss" in r]
    if not train and not val:
        return None
    figure = optional("matplotlib.figure")
    backend = optional("matplotlib.backends.backend_agg")
    if figure is None or backend is None:
        if not _warned_no_matplotlib:
            _warned_no_matplotlib = True
            _log.warning("loss.png skipped: drawing it needs matplotlib, which is not installed "
                         "(pip install 'llmkit[plot]'); metrics.jsonl has the numbers")
        return None
    # A Figure of its own, not pyplot: no global state, no backend switch in the user's process.
    fig = figure.Figure(figsize=(7, 4.2))
    backend.FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
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
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    return path
