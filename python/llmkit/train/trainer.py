"""The pretraining loop: one Trainer for every model family and objective.

What a step does, in order:
  1. the sample positions [step * B, (step + 1) * B) of an endless sequence of
     seeded per-epoch permutations name the global batch; this rank takes its
     contiguous share and splits it into micro-batches (the objective collates
     each from (example, sample id, epoch) alone, so any rank layout and any
     resume sees the same sequences with the same masks);
  2. the target counts of the whole global batch are summed (all-reduce), and
     each micro-batch's loss is its summed token loss over that global count:
     accumulation and data parallelism give exactly the full-batch gradient;
  3. clip, AdamW at the warmup + cosine learning rate, log, evaluate, save.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmkit.objectives import ObjectiveModule
from llmkit.utils import get_logger, progress_bar

from . import checkpoint, distributed
from .config import TrainConfig
from .metrics import MetricsLog, peak_tflops, plot_loss_curve, training_flops_per_token
from .optim import WarmupCosine, build_adamw

_log = get_logger(__name__)

# What a run writes into out_dir: a directory holding any of these holds a previous run.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "model")


def previous_run(out_dir) -> list[str]:
    """What a previous run left in `out_dir`: the names of :data:`RUN_OUTPUTS` present (and not empty)."""
    found = []
    for name in RUN_OUTPUTS:
        path = Path(out_dir) / name
        if (path.is_dir() and any(path.iterdir())) or (path.is_file() and path.stat().st_size > 0):
            found.append(name)
    return found


def check_output_dir(out_dir, resume, overwrite: bool) -> list[str]:
    """Refuse to start a run in `out_dir` that would silently mix with, or
    clobber, a previous one: FileExistsError without `resume` or `overwrite`.
    Returns what the previous run left (for `overwrite` to delete)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output directory and --overwrite replaces it: "
                         "give one of them")
    if resume:
        return []
    previous = previous_run(out_dir)
    if previous and not overwrite:
        raise FileExistsError(f"{out_dir} holds a previous run ({', '.join(previous)}): pass --resume to continue "
                              f"it, --overwrite to replace it, or choose another --output directory")
    return previous


@contextlib.contextmanager
def _logging_through(bar):
    """While the progress bar is drawn, llmkit's log lines go through tqdm.write
    (above the bar, not into it). Only the first logger from llmkit.train up to
    the root that has a console handler is redirected, so that no line is shown twice."""
    if bar.disable:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger: logging.Logger | None = _log
    while logger is not None:
        if any(type(h) is logging.StreamHandler for h in logger.handlers):
            with logging_redirect_tqdm(loggers=[logger]):
                yield
            return
        logger = logger.parent if logger.propagate else None
    yield


class SampleOrder:
    """Position p of the training stream -> (epoch, example index): epoch
    p // n, the example at p % n of that epoch's seeded permutation."""

    def __init__(self, n_examples: int, seed: int):
        self.n, self.seed = n_examples, seed
        self._epoch, self._perm = -1, None

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, 0x5A3D, epoch]).permutation(self.n)
        return epoch, int(self._perm[offset])


def model_config_dict(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if is_dataclass(config):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    return {}


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    return device


class Trainer:
    """Pretrain `model` with `objective` (llmkit.objectives) on token shards.

    Args:
        model: an llmkit model of the objective's family (GPT for clm, a BERT
            masked-LM head for mlm, T5 for span).
        objective: from :func:`llmkit.objectives.get_objective`.
        train_data / eval_data: :class:`llmkit.data.TokenShards`.
        config: :class:`TrainConfig`.
        tokenizer: saved next to the exported model (optional).
    """

    def __init__(self, model: nn.Module, objective, train_data, config: TrainConfig, eval_data=None,
                 tokenizer=None):
        self.config = config
        self.objective = objective
        self.tokenizer = tokenizer
        self.device = resolve_device(config.device)
        self.dist = distributed.setup(config.distributed, self.device)
        self.out_dir = Path(config.out_dir)
        if config.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None and not hasattr(data, "doc_starts"):
                raise TypeError(f"{name} must be llmkit.data.TokenShards (e.g. TokenizedCorpus.train), "
                                f"got {type(data).__name__}")
        self.model = model.to(self.device)
        self.model_config = model_config_dict(model)
        if config.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(f"{type(model).__name__} has no gradient checkpointing")
            model.gradient_checkpointing_enable()

        self.train_examples = objective.examples(train_data, config.seq_len)
        if len(self.train_examples) == 0:
            raise ValueError(f"the training data ({train_data.n_tokens} tokens) is too small for one "
                             f"{config.seq_len}-token sequence of the {objective.name} objective")
        self.eval_examples = None
        if eval_data is not None:
            try:
                self.eval_examples = objective.examples(eval_data, config.seq_len)
            except ValueError as err:  # a tiny corpus: its validation split is too small, not the run
                _log.warning("no evaluation: the validation split does not make one example (%s)", err)
        self.micro, self.accum = config.grad_accum(self.dist.world_size)
        self.order = SampleOrder(len(self.train_examples), config.seed)

        if config.compile:
            for block in distributed.block_lists(model):
                block.compile()
        self.module = distributed.wrap(ObjectiveModule(model, objective), self.dist, self.device)
        self.optimizer = build_adamw(self.module, config.lr, config.weight_decay, config.betas, config.eps,
                                     self.device.type)
        self.schedule = WarmupCosine(config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.dtype)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.dtype == "fp16")
        self.step = 0
        self.flops_per_token = training_flops_per_token(model, config.seq_len)
        self.peak = config.peak_tflops or peak_tflops(self.device, config.dtype)
        self.metrics: MetricsLog | None = None

    # ------------------------------------------------------------ batches --
    def _collate(self, pairs: list[tuple[int, int]], examples) -> dict:
        """Collate (epoch, index) pairs; a micro-batch that straddles an epoch
        boundary is collated per epoch and concatenated."""
        parts, start = [], 0
        while start < len(pairs):
            epoch = pairs[start][0]
            end = start
            while end < len(pairs) and pairs[end][0] == epoch:
                end += 1
            ids = [i for _, i in pairs[start:end]]
            parts.append(self.objective.collate([examples[i] for i in ids], ids, epoch))
            start = end
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _micro_batches(self, step: int) -> list[dict]:
        per_rank = self.micro * self.accum
        first = step * self.config.batch_size + self.dist.rank * per_rank
        pairs = [self.order(p) for p in range(first, first + per_rank)]
        return [self._collate(pairs[i:i + self.micro], self.train_examples) for i in range(0, per_rank, self.micro)]

    @staticmethod
    def _input_tokens(batch: dict) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    def _sync_context(self, last: bool):
        if self.dist.mode == "ddp" and not last:
            return self.module.no_sync()
        if self.dist.mode == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ------------------------------------------------------------- train --
    def train_step(self) -> dict:
        """One optimizer step; returns the step's metrics (equal on every rank)."""
        config = self.config
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._micro_batches(self.step)
        counts: dict[str, int] = {}
        tokens = 0
        for batch in batches:
            for k, n in self.objective.target_counts(batch).items():
                counts[k] = counts.get(k, 0) + int(n)
            tokens += self._input_tokens(batch)
        keys = sorted(counts)
        totals = distributed.all_reduce_sum(
            torch.tensor([counts[k] for k in keys] + [tokens], dtype=torch.float64), self.dist)
        global_counts = dict(zip(keys, totals[:-1].tolist()))
        sums = torch.zeros(2 * len(keys), dtype=torch.float64)
        scored: set[str] = set()  # terms that count correct predictions (MLM, NSP)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self._sync_context(last):
                with self.autocast():
                    terms = self.module(batch)  # the objective moves it to the model's device
                loss = sum(terms[k].sum.float() * (self.dist.world_size / global_counts[k])
                           for k in keys if global_counts[k] > 0)
                if isinstance(loss, torch.Tensor):
                    self.scaler.scale(loss).backward()
            for j, k in enumerate(keys):
                sums[j] += float(terms[k].sum.detach())
                if terms[k].correct is not None:
                    sums[len(keys) + j] += float(terms[k].correct)
                    scored.add(k)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), config.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        sums = distributed.all_reduce_sum(sums, self.dist)
        record = {"split": "train", "step": self.step, "lr": lr, "tokens": int(totals[-1])}
        record.update(self._losses(keys, sums, global_counts, scored))
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    def _losses(self, keys, sums, counts, scored) -> dict:
        out = {}
        total = 0.0
        for j, k in enumerate(keys):
            if counts[k] > 0:
                out[f"loss_{k}"] = float(sums[j]) / counts[k]
                total += out[f"loss_{k}"]
                if k in scored:
                    out[f"accuracy_{k}"] = float(sums[len(keys) + j]) / counts[k]
        out["loss"] = total
        token_key = next((k for k in keys if k != "nsp"), None)
        if token_key is not None and f"loss_{token_key}" in out:
            out["ppl"] = math.exp(min(out[f"loss_{token_key}"], 50.0))
        return out

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Loss (per objective term), perplexity and MLM accuracy on the first
        `eval_samples` validation sequences (the same ones, masks included, every time)."""
        if self.eval_examples is None or len(self.eval_examples) == 0 or self.config.eval_samples == 0:
            return None
        world = self.dist.world_size
        n = min(self.config.eval_samples, len(self.eval_examples))
        n = max(world, n - n % world) if n >= world else 0
        if n == 0:
            return None
        mine = list(range(self.dist.rank, n, world))  # equal length on every rank (FSDP needs that)
        module = self.module.module if self.dist.mode == "ddp" else self.module
        module.eval()
        sums = None
        counts: dict[str, float] = {}
        scored: set[str] = set()
        try:
            for start in range(0, len(mine), self.micro):
                ids = mine[start:start + self.micro]
                batch = self.objective.collate([self.eval_examples[i] for i in ids], ids, 0)
                for k, c in self.objective.target_counts(batch).items():
                    counts[k] = counts.get(k, 0) + c
                with self.autocast():
                    terms = module(batch)
                keys = sorted(terms)
                if sums is None:
                    sums = torch.zeros(2 * len(keys), dtype=torch.float64)
                for j, k in enumerate(keys):
                    sums[j] += float(terms[k].sum)
                    if terms[k].correct is not None:
                        sums[len(keys) + j] += float(terms[k].correct)
                        scored.add(k)
        finally:
            module.train()
        keys = sorted(counts)
        totals = distributed.all_reduce_sum(
            torch.cat([sums, torch.tensor([counts[k] for k in keys], dtype=torch.float64)]), self.dist)
        global_counts = dict(zip(keys, totals[2 * len(keys):].tolist()))
        record = {"split": "val", "step": self.step, "samples": n}
        record.update(self._losses(keys, totals[:2 * len(keys)], global_counts, scored))
        return record

    def train(self, resume: bool | str | Path = False) -> dict:
        """Run to `config.steps`. `resume`: True continues from the newest
        complete checkpoint in out_dir (falling back past a damaged newest one,
        with a warning; an error if there is none), a path from that checkpoint.

        Without `resume`, an out_dir that holds a previous run (checkpoints,
        metrics) is refused with FileExistsError unless ``config.overwrite``,
        which deletes that run's outputs first. Returns {"train": last train
        record, "val": last eval record}."""
        config = self.config
        resumed_step = None
        if resume and config.overwrite:
            check_output_dir(self.out_dir, resume, config.overwrite)  # the error: one or the other
        if resume:
            if resume is True:
                path = checkpoint.latest(self.out_dir / "checkpoints")
                if path is None:
                    raise FileNotFoundError(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'} "
                                            f"(run without --resume to start training)")
            else:
                path = Path(resume)
            self.load_checkpoint(path)
            resumed_step = self.step
        else:
            previous = check_output_dir(self.out_dir, resume, config.overwrite)
            distributed.barrier(self.dist)  # every rank has looked before rank 0 deletes
            if previous and self.dist.is_main:
                _log.warning("--overwrite: deleting the previous run's %s in %s", ", ".join(previous), self.out_dir)
                for name in previous:
                    target = self.out_dir / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            torch.manual_seed(config.seed + 1000 * self.dist.rank)  # dropout streams differ per rank
        main = self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", resumed_step)
        bar = progress_bar(total=config.steps, initial=self.step, disable=not (main and config.progress),
                           desc=f"pretrain {self.objective.name}", unit="step")
        with bar, _logging_through(bar):
            return self._train_loop(bar)

    def _train_loop(self, bar) -> dict:
        config = self.config
        main = self.dist.is_main
        last_train, last_val = None, None
        window_tokens, window_start = 0, time.perf_counter()
        rate = None
        title = f"{self.objective.name}: {type(self.model).__name__}"
        while self.step < config.steps:
            record = self.train_step()
            window_tokens += record["tokens"]
            now = time.perf_counter()
            elapsed = now - window_start
            if elapsed > 0:
                rate = window_tokens / elapsed
                record["tokens_per_s"] = rate
                if self.peak:
                    record["mfu"] = self.flops_per_token * rate / (self.peak * 1e12)
            window_tokens, window_start = 0, now
            last_train = record
            if main:
                self.metrics.write(record)
                postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{rate:,.0f}" if rate else "-"}
                if "mfu" in record:
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            at_end = self.step == config.steps
            if (config.eval_every and self.step % config.eval_every == 0) or at_end:
                last_val = self.evaluate()
                if main and last_val is not None:
                    self.metrics.write(last_val)
                    _log.info("step %d: validation loss %.4f%s%s", self.step, last_val["loss"],
                              f", perplexity {last_val['ppl']:.2f}" if "ppl" in last_val else "",
                              f", MLM accuracy {last_val['accuracy_mlm']:.3f}" if "accuracy_mlm" in last_val else "")
                    plot_loss_curve(self.metrics.records(), self.out_dir / "loss.png", title)
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if (config.save_every and self.step % config.save_every == 0) or at_end:
                self.save_checkpoint()
                window_start = time.perf_counter()
        if main and self.metrics is not None:
            plot_loss_curve(self.metrics.records(), self.out_dir / "loss.png", title)
        return {"train": last_train, "val": last_val}

    # -------------------------------------------------------- checkpoints --
    def _meta(self) -> dict:
        return {
            "model": {"class": type(self.model).__name__, "config": self.model_config},
            "objective": {"name": self.objective.name, "options": {k: v for k, v in vars(self.objective).items()
                                                                     if isinstance(v, (bool, int, float, str))}},
            "schedule": self.schedule.state_dict(),
            "data": {"consumed_samples": self.step * self.config.batch_size, "seed": self.config.seed,
                     "examples": len(self.train_examples)},
            "train_config": self.config.to_dict(),
            "torch": torch.__version__,
        }

    def _full_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.module, options=options)
        optimizer_state = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        return model_state, optimizer_state

    def model_state_dict(self) -> dict:
        """The full model weights (on CPU, gathered from every shard), keyed as the model names them."""
        model_state, _ = self._full_state()
        return {k.removeprefix("model."): v for k, v in model_state.items()}

    def save_checkpoint(self) -> Path | None:
        """Save everything a resume needs (collective: every rank calls it)."""
        model_state, optimizer_state = self._full_state()
        rngs = distributed.all_gather_objects(_rng_state(self.device), self.dist)
        path = None
        if self.dist.is_main:
            tied_aliases = checkpoint.tied_aliases(self.model)
            weights = {k.removeprefix("model."): v for k, v in model_state.items()}
            weights = {k: v for k, v in weights.items() if k not in tied_aliases}
            meta = self._meta()
            meta["tied"] = tied_aliases
            path = checkpoint.save(self.out_dir / "checkpoints", self.step, weights, optimizer_state, rngs, meta,
                                   keep=self.config.keep_checkpoints)
        distributed.barrier(self.dist)
        return path

    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, schedule, RNG states and data position."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = checkpoint.load(path)
        meta = state["meta"]
        saved_model = meta["model"]
        differences = checkpoint.config_differences(saved_model["config"], self.model_config)
        if saved_model["class"] != type(self.model).__name__ or differences:
            raise checkpoint.CheckpointError(
                f"{path} was written for another model ({saved_model['class']}"
                + (f"; {'; '.join(differences[:6])}" if differences else "")
                + f"), not this {type(self.model).__name__}: resume with the same preset and options")
        if meta["objective"]["name"] != self.objective.name:
            raise checkpoint.CheckpointError(f"{path} was trained with objective {meta['objective']['name']!r}, "
                                             f"not {self.objective.name!r}")
        saved_config = meta["train_config"]
        for key in ("batch_size", "seq_len", "seed"):
            if saved_config[key] != getattr(self.config, key):
                raise checkpoint.CheckpointError(
                    f"{path} was trained with {key}={saved_config[key]}, this run has {getattr(self.config, key)}: "
                    "resuming exactly needs the same batch size, sequence length and seed")
        weights = dict(state["model"])
        for alias, source in meta.get("tied", {}).items():
            weights[alias] = weights[source]
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, {f"model.{k}": v for k, v in weights.items()}, options=options)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=options)
        self.step = meta["step"]
        if self.step > self.config.steps:
            _log.warning("the checkpoint is at step %d, past steps=%d: nothing to train", self.step,
                         self.config.steps)
        rng = state["rng"]
        mine = rng.get(self.dist.rank) if meta["world_size"] == self.dist.world_size else None
        if mine is None:
            _log.warning("the checkpoint was written with another number of processes: RNG streams restart")
            torch.manual_seed(self.config.seed + 1000 * self.dist.rank + self.step)
        else:
            _set_rng_state(mine, self.device)

    # ------------------------------------------------------------- export --
    def export(self, directory) -> Path | None:
        """Write the trained model in Hugging Face format (config.json +
        model.safetensors; `from_pretrained` / transformers load it) with the
        tokenizer, on rank 0. Collective."""
        weights = self.model_state_dict()
        directory = Path(directory)
        if self.dist.is_main:
            fresh = type(self.model)(self.model.config)
            missing, unexpected = fresh.load_state_dict(weights, strict=False)
            if unexpected or set(missing) - set(checkpoint.tied_aliases(fresh)):
                raise RuntimeError(f"export: state mismatch (missing {missing}, unexpected {unexpected})")
            fresh.save_pretrained(directory, tokenizer=self.tokenizer)  # one atomic directory, tokenizer inside
        distributed.barrier(self.dist)
        return directory if self.dist.is_main else None
