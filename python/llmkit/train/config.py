"""TrainConfig: every knob of a pretraining run, from flags or a TOML / JSON file."""
from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DTYPES = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """Hyperparameters and bookkeeping of :class:`llmkit.train.Trainer`.

    ``batch_size`` is the global batch: sequences per optimizer step over all
    ranks and micro-batches (nanoGPT's total batch). Each rank runs
    ``micro_batch_size`` sequences a forward, so gradient accumulation is
    ``batch_size / (micro_batch_size * world_size)`` steps; the loss is always
    normalised by the global number of target tokens, which makes accumulation
    and data parallelism give exactly the full-batch gradient.
    """

    out_dir: str = "runs/pretrain"
    steps: int = 1000
    batch_size: int = 32
    micro_batch_size: int | None = None  # None: batch_size / world_size (no accumulation)
    seq_len: int = 128
    # AdamW, linear warmup then cosine decay to min_lr_ratio * lr (nanoGPT / GPT-3).
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    dtype: str = "fp32"  # autocast: fp32 (off), bf16, fp16 (with a GradScaler)
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    gradient_checkpointing: bool = False
    eval_every: int = 100  # steps; 0: only at the end
    eval_samples: int = 256  # validation sequences per evaluation (fixed: the same every time)
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms: a resumed run repeats bit for bit
    distributed: str = "auto"  # auto (ddp under torchrun), none, ddp, fsdp (FSDP2 fully_shard per block)
    device: str = "auto"  # auto: cuda when available (under torchrun: cuda:LOCAL_RANK), cpu, cuda, cuda:N
    peak_tflops: float | None = None  # for MFU; None: estimated from the device
    progress: bool = True
    overwrite: bool = False  # train into an out_dir holding a previous run, deleting its outputs (else refused)
    extra: dict = field(default_factory=dict)  # free-form, recorded in checkpoints (e.g. the model preset)

    def __post_init__(self):
        self._check_types()
        self.betas = tuple(float(b) for b in self.betas)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.micro_batch_size is None or self.micro_batch_size >= 1,
             f"micro_batch_size must be >= 1, got {self.micro_batch_size}"),
            (self.seq_len >= 4, f"seq_len must be >= 4, got {self.seq_len}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.distributed in DISTRIBUTED, f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}"),
            (self.eval_every >= 0 and self.save_every >= 0,
             f"eval_every and save_every must be >= 0, got {self.eval_every} and {self.save_every}"),
            (self.eval_samples >= 0, f"eval_samples must be >= 0, got {self.eval_samples}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be > 0, got {self.peak_tflops}"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (bool(self.out_dir), "out_dir must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_types(self) -> None:
        """Every field of the type it is declared with (a config file can hold anything); floats finite."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            optional = type(None) in typing.get_args(hint)
            if value is None and optional:
                continue
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if optional else hint
            base = typing.get_origin(base) or base
            if base is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok and not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value}")
            elif base is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif base is tuple:
                ok = isinstance(value, (tuple, list)) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            else:
                ok = isinstance(value, base)
            if not ok:
                what = "a finite number" if base is float else getattr(base, "__name__", str(base))
                raise ValueError(f"{f.name} must be {'an' if what[0] in 'aeiou' else 'a'} {what}"
                                 f"{' or None' if optional else ''}, got {value!r}")

    def grad_accum(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) for `world_size` ranks."""
        micro = self.micro_batch_size or max(1, self.batch_size // world_size)
        if self.batch_size % (micro * world_size):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size {micro} "
                             f"x world size {world_size}")
        return micro, self.batch_size // (micro * world_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ValueError(f"training options must be a table of name = value, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        return cls.from_dict({**read_config_file(path), **overrides})


def read_config_file(path) -> dict:
    """A TOML or JSON file of options (flat keys, as the flags spell them with _)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ValueError("TOML config files need Python 3.11 (tomllib); use a .json file") from None
            values = tomllib.loads(text)
    except ValueError as err:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a table of options")
    return {k.replace("-", "_"): v for k, v in values.items()}
