"""`llmkit pretrain` and `llmkit corpus`: flags or a TOML / JSON config file (flags win).

    llmkit pretrain --model gpt-tiny --objective clm --steps 300 -o runs/gpt
    llmkit pretrain --model bert-tiny --objective mlm --data corpus/ --whole-word-masking
    llmkit pretrain --config run.toml --resume
    torchrun --nproc_per_node 2 -m llmkit pretrain --model gpt-tiny --distributed ddp ...
    llmkit corpus prepare my_texts/ -o corpus/ --kind wordpiece --vocab-size 30522
    llmkit corpus info corpus/

``-o/--output`` (``--out-dir`` / ``--out`` kept as aliases) is where a command
writes; ``pretrain`` refuses an output directory that holds a previous run
unless ``--resume`` (continue it) or ``--overwrite`` (replace it).
``--device`` (auto, cpu, cuda, cuda:N) is where pretraining computes. A user
error (a bad value, a missing file) ends in one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from llmkit.utils.cliargs import add_device_argument, add_output_argument

from .config import TrainConfig, read_config_file

# Options of the run itself (not TrainConfig fields), with their config-file keys.
_RUN_OPTIONS = ("model", "objective", "data", "tokenizer", "vocab_size", "max_documents", "mlm_probability",
                "whole_word_masking", "masking", "nsp", "noise_density", "mean_span_length", "threads", "sample",
                "max_new_tokens", "model_config")
_SKIP = {"extra", "betas", "out_dir", "device"}  # flags of their own below
_BOOL_HELP = {"overwrite": "start a new run in an output directory holding a previous one, deleting its "
                           "checkpoints, metrics, loss curve and model (without it, such a directory is refused)",
              "deterministic": "torch.use_deterministic_algorithms: a resumed run repeats the losses bit for bit",
              "compile": "torch.compile each transformer block",
              "gradient_checkpointing": "recompute activations in the backward pass (less memory)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="TOML or JSON file of options (keys as the flags, with _ or -)")
    run.add_argument("--model", help="model preset (llmkit models list): gpt-*, llama-tiny, bert-*, roberta-*, t5-*")
    run.add_argument("--objective", choices=("clm", "mlm", "span"), help="default: the model family's")
    run.add_argument("--data", help="text file, folder, JSONL ({'text': ...}) or prepared corpus directory "
                                    "(default: the shipped English corpus)")
    run.add_argument("--tokenizer", help="tokenizer.json or its directory (default: train one on the data, cached)")
    run.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (default: the preset's)")
    run.add_argument("--max-documents", type=int, help="use only the first N documents of the data")
    run.add_argument("--model-config", action="append", metavar="KEY=VALUE",
                     help="override a field of the preset's config (JSON value), e.g. n_layer=4, "
                          "hidden_dropout_prob=0; repeatable")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue from the newest complete checkpoint in the output directory")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--sample", action="append", metavar="PROMPT",
                     help="after training, complete PROMPT (clm / span) or fill its [MASK]s (mlm); repeatable")
    run.add_argument("--max-new-tokens", type=int, default=None)
    obj = parser.add_argument_group("objective")
    obj.add_argument("--mlm-probability", type=float, help="MLM: fraction of tokens selected (0.15)")
    obj.add_argument("--whole-word-masking", action="store_true", default=None)
    obj.add_argument("--masking", choices=("static", "dynamic"), help="MLM / span: masks fixed per sequence "
                                                                      "(BERT) or new each epoch (RoBERTa, default)")
    obj.add_argument("--nsp", action="store_true", default=None, help="MLM: add next-sentence prediction (BERT)")
    obj.add_argument("--noise-density", type=float, help="span: fraction of tokens corrupted (0.15)")
    obj.add_argument("--mean-span-length", type=float, help="span: mean corrupted span length (3)")
    train = parser.add_argument_group("training (TrainConfig)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if hints[f.name] is bool:
            if default:
                train.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                   default=None)
            else:
                train.add_argument(flag, dest=f.name, action="store_true", default=None, help=_BOOL_HELP.get(f.name))
            continue
        kind = {int: int, float: float, str: str}.get(hints[f.name])
        if kind is None:  # int | None, float | None
            kind = float if "float" in str(hints[f.name]) else int
        train.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default {default}")
    train.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"))
    add_output_argument(train, aliases=("--out-dir",), default=None,
                        help=f"output directory: metrics, loss curve, checkpoints, model "
                             f"(default {TrainConfig.out_dir})")
    add_device_argument(train, default=None, help="auto (CUDA when available; under torchrun cuda:LOCAL_RANK), "
                                                  "cpu, cuda or cuda:N (default auto)")


def options_from_args(args: argparse.Namespace) -> tuple[dict, TrainConfig]:
    """(run options, TrainConfig) from the config file overlaid with the flags given."""
    values = read_config_file(args.config) if args.config else {}
    if "output" in values:  # the flag's name, accepted in a config file as well as out_dir
        if "out_dir" in values:
            raise ValueError(f"{args.config}: give output or out_dir, not both")
        values["out_dir"] = values.pop("output")
    train_names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - train_names - set(_RUN_OPTIONS) - {"resume"})
    if unknown:
        raise ValueError(f"{args.config}: unknown options {unknown}; known: "
                         f"{sorted((train_names - {'extra'}) | set(_RUN_OPTIONS) | {'output', 'resume'})}")
    for name in list(train_names) + list(_RUN_OPTIONS) + ["resume"]:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if getattr(args, "output", None) is not None:
        values["out_dir"] = args.output
    run = {name: values.pop(name) for name in list(_RUN_OPTIONS) + ["resume"] if name in values}
    if "model" not in run:
        raise ValueError("--model is required (a preset: see `llmkit models list`)")
    if not isinstance(run["model"], str):
        raise ValueError(f"model must be a preset name, got {run['model']!r}")
    for name in ("vocab_size", "max_documents", "threads", "max_new_tokens"):
        value = run.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("data", "tokenizer", "objective", "masking"):
        if run.get(name) is not None and not isinstance(run[name], str):
            raise ValueError(f"{name} must be a string, got {run[name]!r}")
    return run, TrainConfig.from_dict(values)


def _samples(outcome: dict, run: dict, objective: str) -> None:
    prompts = run.get("sample") or []
    if not prompts or outcome["trainer"].dist.rank != 0:
        return
    from .samples import fill_masks, complete

    trainer, tokenizer = outcome["trainer"], outcome["tokenizer"]
    model = trainer.model
    if trainer.dist.mode == "fsdp":  # rank 0 holds only shards: sample from the exported full model
        model = type(model).from_hf(outcome["model_dir"]).to(trainer.device)
    for prompt in prompts:
        if objective == "mlm":
            print(f"  {prompt!r} -> {fill_masks(model, tokenizer, prompt)!r}")
        else:
            print(f"  {prompt!r} -> {complete(model, tokenizer, prompt, run.get('max_new_tokens') or 24)!r}")


def _model_overrides(items) -> dict:
    """["n_layer=4", "dropout=0.0"] (flags) or a table (config file) -> {field: value}."""
    import json

    if isinstance(items, dict):
        return dict(items)
    if items is not None and not isinstance(items, list):
        raise ValueError(f"model_config must be a table of field = value (or KEY=VALUE flags), got {items!r}")
    overrides = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-config takes KEY=VALUE (e.g. n_layer=4), got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            overrides[key.strip()] = value  # a bare string (e.g. position=rope)
    return overrides


def _check_model_overrides(preset: str, overrides: dict) -> None:
    """Unknown fields, and values the config refuses, as one clear error before any data work."""
    from dataclasses import fields as dataclass_fields

    from .pipeline import _preset_config, model_family

    if not overrides:
        return
    family = model_family(preset)
    try:
        config = _preset_config(family, preset)
    except Exception:  # noqa: BLE001 - the preset itself fails later with its own message
        return
    if hasattr(config, "__dataclass_fields__"):
        known = {f.name for f in dataclass_fields(config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"--model-config: {preset} has no field {', '.join(unknown)}; its fields: "
                             f"{', '.join(sorted(known))}")
        hints = typing.get_type_hints(type(config))
        for key, value in overrides.items():
            allowed = _scalar_types(hints.get(key))
            if allowed and not (isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"--model-config {key}={value!r}: {key} must be {names}")
    try:
        _preset_config(family, preset, **overrides)
    except (TypeError, ValueError, AssertionError, KeyError, AttributeError) as err:
        raise ValueError(f"--model-config {overrides}: {preset} refuses it: {err}") from None


def _scalar_types(hint) -> tuple | None:
    """The Python types a config field of annotation `hint` takes, when they are plain scalars."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType",
                                                                                          None)) else (hint,)
    if not args or not all(a in (int, float, bool, str, type(None)) for a in args):
        return None
    allowed = set(args)
    if float in allowed:
        allowed.add(int)  # 0 for 0.0
    return tuple(allowed)


def run(args: argparse.Namespace) -> int:
    """`llmkit pretrain`. User errors are raised (ValueError, FileNotFoundError, FileExistsError, ...) with a
    message saying what was wrong; the `llmkit` command prints them as one line and exits with status 2."""
    return _run(args)


def _run(args) -> int:
    import torch

    from .pipeline import FAMILY_OBJECTIVE, model_family, pretrain

    run_options, config = options_from_args(args)
    family = model_family(run_options["model"])
    overrides = _model_overrides(run_options.get("model_config"))
    _check_model_overrides(run_options["model"], overrides)
    if run_options.get("threads"):
        torch.set_num_threads(int(run_options["threads"]))
    objective = run_options.get("objective") or FAMILY_OBJECTIVE[family]
    objective_options = {}
    for key, option in (("mlm_probability", "mlm_probability"), ("whole_word_masking", "whole_word"),
                        ("masking", "masking"), ("nsp", "nsp"), ("noise_density", "noise_density"),
                        ("mean_span_length", "mean_noise_span_length")):
        if run_options.get(key) is not None:
            objective_options[option] = run_options[key]
    outcome = pretrain(run_options["model"], objective, run_options.get("data"), config,
                       model_overrides=overrides,
                       tokenizer=run_options.get("tokenizer"), vocab_size=run_options.get("vocab_size"),
                       objective_options=objective_options, max_documents=run_options.get("max_documents"),
                       resume=bool(run_options.get("resume")))
    trainer = outcome["trainer"]
    if trainer.dist.is_main:
        result = outcome["result"]
        val = result.get("val") or {}
        train = result.get("train") or {}
        print(f"llmkit pretrain: {trainer.step} steps; train loss {train.get('loss', float('nan')):.4f}"
              + (f", validation loss {val['loss']:.4f}" if "loss" in val else "")
              + (f" (perplexity {val['ppl']:.2f})" if "ppl" in val else "")
              + (f", MLM accuracy {val['accuracy_mlm']:.3f}" if "accuracy_mlm" in val else ""))
        out = Path(config.out_dir)
        plot = out / "loss.png"
        print(f"  metrics {out / 'metrics.jsonl'}, "
              + (f"loss curve {plot}, " if plot.is_file() else "")
              + f"checkpoints {out / 'checkpoints'}, model {outcome['model_dir']}")
    _samples(outcome, run_options, objective)
    from . import distributed

    distributed.teardown(trainer.dist)
    return 0


# ------------------------------------------------------- llmkit corpus --
def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="train a tokenizer (or take one) and tokenize text into shards")
    prepare.add_argument("source", nargs="?", default=None,
                         help="text file, folder or JSONL (default: the shipped English corpus)")
    add_output_argument(prepare, required=True, aliases=("--out",),
                        help="output directory (llmkit pretrain --data reads it)")
    prepare.add_argument("--tokenizer", help="tokenizer.json or its directory (default: train one)")
    prepare.add_argument("--kind", choices=("bpe", "wordpiece"), default="bpe")
    prepare.add_argument("--vocab-size", type=int, default=8192,
                         help="vocabulary of the trained tokenizer (at most 2^24; default %(default)s)")
    prepare.add_argument("--sentinels", type=int, default=0, help="<extra_id_N> tokens for span corruption")
    prepare.add_argument("--val-fraction", type=float, default=0.005)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--max-documents", type=int, default=None)
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    prepare.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    info = actions.add_parser("info", help="describe a prepared corpus")
    info.add_argument("path")


def run_corpus(args: argparse.Namespace) -> int:
    """`llmkit corpus prepare|info` (errors as in :func:`run`)."""
    return _run_corpus(args)


def _run_corpus(args: argparse.Namespace) -> int:
    from llmkit.data import TokenizedCorpus, tokenize_corpus, train_tokenizer
    from llmkit.data.tokenizer import Tokenizer, check_vocab_size

    if args.action == "info":
        corpus = TokenizedCorpus.open(args.path)
        print(corpus)
        for name, split in (("train", corpus.train), ("val", corpus.val)):
            print(f"  {name}: {split.n_tokens:,} tokens in {split.n_docs:,} documents")
        print(f"  tokenizer: vocabulary {corpus.tokenizer.vocab_size:,}, special {corpus.tokenizer.special_tokens}")
        return 0
    from llmkit.data.shards import _check_target
    from llmkit.data.sources import source_files

    # Everything that can be refused is refused before the tokenizer trains (minutes on a big corpus).
    if args.max_documents is not None and args.max_documents < 1:
        raise ValueError(f"--max-documents must be a positive integer, got {args.max_documents}")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    source_files(args.source)
    _check_target(Path(args.output).expanduser(), args.overwrite)
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        check_vocab_size(args.vocab_size)
        tokenizer = train_tokenizer(args.source, vocab_size=args.vocab_size, kind=args.kind, sentinels=args.sentinels,
                                    max_documents=args.max_documents, progress=args.progress)
    corpus = tokenize_corpus(args.source, tokenizer, args.output, val_fraction=args.val_fraction, seed=args.seed,
                             max_documents=args.max_documents, overwrite=args.overwrite, progress=args.progress)
    print(f"llmkit corpus: {corpus.path}: train {corpus.train.n_tokens:,} tokens / {corpus.train.n_docs:,} documents, "
          f"val {corpus.val.n_tokens:,} / {corpus.val.n_docs:,}; vocabulary {corpus.tokenizer.vocab_size:,}")
    return 0
