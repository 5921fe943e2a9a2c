"""TrainConfig: every knob of a pretraining run, from flags or a TOML / JSON file."""
from __future__ import annotations

import json
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
    device: str = "auto"  # auto: cuda when available
    peak_tflops: float | None = None  # for MFU; None: estimated from the device
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, recorded in checkpoints (e.g. the model preset)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.seq_len >= 4, "seq_len must be >= 4"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.distributed in DISTRIBUTED, f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}"),
            (self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0"),
            (self.eval_samples >= 0, "eval_samples must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

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
        raise FileNotFoundError(f"no config file at {path}")
    text = path.read_text(encoding="utf-8")
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
