"""Pretraining: llmkit's Trainer vs transformers' Trainer, same model, data, steps.

`llmkit bench pretrain`. Both contenders train the same GPT (llmkit preset
``gpt-6l-384``: nanoGPT's baby GPT, 6 layers x 384, context 256, with an
8192-token byte-level BPE trained on the shipped English corpus; --quick:
``gpt-tiny`` shapes for a smoke run) from the same initial weights (llmkit's
init, handed to transformers through ``to_hf``) on the same blocks in the
same order, with the same hyperparameters: AdamW lr 1e-3, betas 0.9 / 0.99,
weight decay 0.1, clip 1.0, 20 warmup steps then cosine to 0.1 x lr, no
dropout, fp32 on the CPU. Validation loss is the token-weighted mean over
the same held-out blocks, computed by each side's own evaluation.
tokens/s = trained tokens / training wall time (evaluation and checkpoints
excluded; transformers' Trainer from on_train_begin to on_train_end). The
machine drifts over the ~15 minutes of two full runs, so after them each
contender trains again for 20 steps, alternating (transformers first), --repeats
times (default 2; quick: 1), and a contender's tokens/s is the median of its runs.

Targets (issue 7): validation loss at most 0.02 above transformers', at
>= 1.2x its tokens/s. Things that differ by design (recorded in the JSON):
the optimizer groups (llmkit: no decay on embeddings; transformers decays
them), the first warmup step (transformers' has lr 0).
"""
from __future__ import annotations

import datetime as _dt
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmkit.utils import atomic_write, get_logger, optional

from . import register
from .harness import Benchmark, RunOptions, aligned, machine_info, report_run_result

_log = get_logger(__name__)

TARGET_SPEEDUP, MAX_LOSS_GAP = 1.2, 0.02
FULL = dict(preset="gpt-6l-384", vocab_size=8192, seq_len=256, batch_size=16, steps=120, eval_samples=128)
QUICK = dict(preset="gpt-tiny", vocab_size=8192, seq_len=128, batch_size=8, steps=30, eval_samples=32)
HYPER = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0, warmup_steps=20, min_lr_ratio=0.1,
             seed=1337)


def _corpus(vocab_size: int, progress: bool):
    from llmkit.data import prepare_corpus
    from llmkit.train.pipeline import get_tokenizer

    tokenizer = get_tokenizer(None, {"kind": "bpe", "vocab_size": vocab_size, "sentinels": 0}, progress=progress)
    return prepare_corpus(None, tokenizer, val_fraction=0.02, progress=progress)


def run(opts: RunOptions, out_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="llmkit-bench-pretrain-") as work:  # scratch, removed at the end
        return _run(opts, Path(work))


def _run(opts: RunOptions, work: Path) -> dict:
    from llmkit.bench.pretrain_reference import train_reference
    from llmkit.objectives import get_objective
    from llmkit.train import TrainConfig, Trainer
    from llmkit.train.pipeline import build_model
    from llmkit.train.trainer import model_config_dict

    shape = QUICK if opts.quick else FULL
    started = time.perf_counter()
    corpus = _corpus(shape["vocab_size"], opts.progress)
    objective = get_objective("clm", corpus.tokenizer, seed=HYPER["seed"])
    torch.manual_seed(HYPER["seed"])
    model = build_model("gpt", shape["preset"], corpus.tokenizer, shape["seq_len"], dropout=0.0)
    model.to_hf(work / "init")  # transformers starts from the very same weights
    config = TrainConfig(out_dir=str(work / "llmkit"), steps=shape["steps"], batch_size=shape["batch_size"],
                         seq_len=shape["seq_len"], lr=HYPER["lr"], betas=HYPER["betas"],
                         weight_decay=HYPER["weight_decay"], grad_clip=HYPER["grad_clip"],
                         warmup_steps=HYPER["warmup_steps"], min_lr_ratio=HYPER["min_lr_ratio"],
                         eval_every=0, eval_samples=shape["eval_samples"], seed=HYPER["seed"],
                         progress=opts.progress, keep_checkpoints=1)
    trainer = Trainer(model, objective, corpus.train, config, eval_data=corpus.val)
    # The blocks llmkit will read, in its order, and the validation blocks its evaluation scores.
    n_train = shape["steps"] * shape["batch_size"]
    order = [trainer.order(p)[1] for p in range(n_train)]
    train_blocks = np.stack([trainer.train_examples[i] for i in order])
    n_val = min(shape["eval_samples"], len(trainer.eval_examples))
    val_blocks = np.stack([trainer.eval_examples[i] for i in range(n_val)])
    config_dict = model_config_dict(model)

    contenders = []
    outcome = trainer.train()
    records = trainer.metrics.records()
    steps = [r for r in records if r["split"] == "train"]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    contenders.append(dict(contender="llmkit", tokens_per_s=sum(r["tokens"] for r in steps) / seconds,
                           train_seconds=seconds, val_loss=outcome["val"]["loss_clm"],
                           train_losses=[r["loss"] for r in steps], n_params=trainer.model.num_parameters()))
    _log.info("training the transformers reference (%d steps) ...", shape["steps"])
    ref = train_reference("gpt", config_dict, train_blocks, val_blocks, steps=shape["steps"],
                          batch_size=shape["batch_size"], lr=HYPER["lr"], warmup_steps=HYPER["warmup_steps"],
                          weight_decay=HYPER["weight_decay"], grad_clip=HYPER["grad_clip"], seed=HYPER["seed"],
                          min_lr_ratio=HYPER["min_lr_ratio"], adam_betas=HYPER["betas"], init_dir=work / "init",
                          order=np.arange(n_train), progress=False)
    contenders.append(dict(contender="transformers Trainer", tokens_per_s=ref["tokens_per_s"],
                           train_seconds=ref["train_seconds"], val_loss=ref["val_loss"],
                           train_losses=ref["train_losses"], n_params=ref["n_params"],
                           version=ref.get("transformers_version")))
    for c in contenders:
        c["runs_tokens_per_s"] = [c["tokens_per_s"]]
    repeats = opts.explicit_repeats or (1 if opts.quick else 2)
    rate_steps = min(20, shape["steps"])
    for r in range(repeats):  # throughput-only runs, alternating, so drift hits both alike
        _log.info("throughput runs %d/%d (%d steps each) ...", r + 1, repeats, rate_steps)
        ref = train_reference("gpt", config_dict, train_blocks, val_blocks[:1], steps=rate_steps,
                              batch_size=shape["batch_size"], lr=HYPER["lr"], warmup_steps=HYPER["warmup_steps"],
                              weight_decay=HYPER["weight_decay"], grad_clip=HYPER["grad_clip"], seed=HYPER["seed"],
                              min_lr_ratio=HYPER["min_lr_ratio"], adam_betas=HYPER["betas"],
                              init_dir=work / "init", order=np.arange(rate_steps * shape["batch_size"]),
                              progress=False)
        contenders[1]["runs_tokens_per_s"].append(ref["tokens_per_s"])
        torch.manual_seed(HYPER["seed"])
        again = build_model("gpt", shape["preset"], corpus.tokenizer, shape["seq_len"], dropout=0.0)
        quick_config = TrainConfig(**{**config.to_dict(), "steps": rate_steps, "eval_samples": 0,
                                      "out_dir": str(work / f"rate{r}"), "progress": False})
        rerun = Trainer(again, objective, corpus.train, quick_config)
        rerun.train()
        steps = [x for x in rerun.metrics.records() if x["split"] == "train"]
        contenders[0]["runs_tokens_per_s"].append(
            sum(x["tokens"] for x in steps) / sum(x["tokens"] / x["tokens_per_s"] for x in steps))
    for c in contenders:
        c["tokens_per_s"] = float(np.median(c["runs_tokens_per_s"]))
    peer = contenders[1]
    ours = contenders[0]
    speedup = ours["tokens_per_s"] / peer["tokens_per_s"]
    gap = ours["val_loss"] - peer["val_loss"]
    verdicts = [
        f"llmkit: {speedup:.2f}x transformers' tokens/s (target >= {TARGET_SPEEDUP}x: "
        f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'}); validation loss {ours['val_loss']:.4f} vs "
        f"{peer['val_loss']:.4f} ({gap:+.4f}; target at most +{MAX_LOSS_GAP}: "
        f"{'met' if gap <= MAX_LOSS_GAP else 'MISSED'})"]
    return dict(benchmark="pretrain", created=_dt.datetime.now().isoformat(timespec="seconds"),
                quick=opts.quick, shape=shape, hyperparameters=HYPER, model_config=config_dict,
                corpus=dict(path=str(corpus.path), train_tokens=corpus.train.n_tokens, val_tokens=corpus.val.n_tokens,
                            val_blocks=n_val), torch_threads=torch.get_num_threads(), machine=machine_info(),
                contenders=contenders, speedup=speedup, val_loss_gap=gap, verdicts=verdicts,
                wall_s=time.perf_counter() - started)


def format_table(result: dict) -> str:
    shape = result["shape"]
    header = ("contender", "tokens/s (median)", "vs transformers", "runs (tokens/s)", "train s", "val loss",
              "val ppl")
    peer = result["contenders"][1]
    rows = [header]
    for c in result["contenders"]:
        rows.append((c["contender"], f"{c['tokens_per_s']:,.0f}", f"{c['tokens_per_s'] / peer['tokens_per_s']:.2f}x",
                     " ".join(f"{v:,.0f}" for v in c["runs_tokens_per_s"]), f"{c['train_seconds']:.1f}",
                     f"{c['val_loss']:.4f}", f"{math.exp(c['val_loss']):.2f}"))
    lines = [f"CLM pretraining of {shape['preset']} (vocab {shape['vocab_size']}, "
             f"{result['contenders'][0]['n_params']:,} parameters) on the shipped corpus: {shape['steps']} steps x "
             f"{shape['batch_size']} x {shape['seq_len']} tokens, {result['torch_threads']} threads; "
             f"validation {result['corpus']['val_blocks']} blocks"]
    lines += aligned(rows, left=1)
    lines += [""] + result["verdicts"]
    return "\n".join(lines) + "\n"


def write_plot(result: dict, path: Path) -> bool:
    """Training loss curves of both contenders, and their tokens/s ratio (False, with a
    warning, without matplotlib: the optional ``plot`` extra)."""
    figure = optional("matplotlib.figure")
    backend = optional("matplotlib.backends.backend_agg")
    if figure is None or backend is None:
        _log.warning("%s skipped: the plot needs matplotlib (pip install 'llmkit[plot]')", path)
        return False
    fig = figure.Figure(figsize=(11, 4), layout="constrained")
    backend.FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    for c in result["contenders"]:
        ax.plot(range(1, len(c["train_losses"]) + 1), c["train_losses"], lw=1,
                label=f"{c['contender']} (val {c['val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("same init, data order and hyperparameters", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    peer = result["contenders"][1]["tokens_per_s"]
    names = [c["contender"] for c in result["contenders"]]
    bars = ax.bar(names, [c["tokens_per_s"] / peer for c in result["contenders"]], color=["tab:blue", "tab:gray"])
    ax.bar_label(bars, fmt="%.2fx")
    ax.axhline(TARGET_SPEEDUP, color="tab:red", linestyle="--", lw=1, label="target")
    ax.set_title("tokens/s relative to transformers' Trainer", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(f"pretraining {result['shape']['preset']}: llmkit vs transformers")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    return True


def run_and_report(opts: RunOptions, out_dir: Path) -> dict:
    result = run(opts, out_dir)
    report_run_result("pretrain", result, out_dir, result["machine"]["hostname"], format_table, write_plot)
    return result


register(Benchmark("pretrain", "CLM pretraining: llmkit Trainer vs transformers Trainer, tokens/s and validation loss",
                   cases=lambda opts: [], runner=run_and_report))
