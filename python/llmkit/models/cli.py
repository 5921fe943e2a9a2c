"""`llmkit models list|info` and `llmkit generate`.

    llmkit models list                      presets of every family, with parameter counts
    llmkit models info DIR [--device D]     what a Hugging Face checkpoint directory holds, loaded into llmkit
    llmkit generate MODEL PROMPT ... [--device D] [--dtype T]
                                            generate from a checkpoint directory (tokenizer.json beside it)

User mistakes (a missing directory, no config.json, a config.json that is not
JSON or names an unknown model_type, weights that do not match the config,
no tokenizer, prompt ids that are not integers) raise ValueError /
FileNotFoundError / NotADirectoryError with a message saying what was wrong;
the `llmkit` command prints it as one line (``llmkit models: error: ...``).
Nothing here writes files, so there is no -o/--output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..utils.cliargs import add_device_argument, resolve_device

# model_type in config.json -> (module under llmkit.models, class name)
FAMILIES = {
    "gpt2": ("gpt", "GPT"), "llama": ("gpt", "GPT"), "mistral": ("gpt", "GPT"), "qwen2": ("gpt", "GPT"),
    "bert": ("bert", "BERT"), "roberta": ("bert", "BERT"),
    "t5": ("t5", "T5"),
    "longformer": ("longformer", "Longformer"),
}
# family module -> (config class, model class); each config class lists its presets as PRESETS
PRESET_TABLES = {
    "gpt": ("GPTConfig", "GPT"),
    "bert": ("BertConfig", "BERT"),
    "t5": ("T5Config", "T5"),
    "longformer": ("LongformerConfig", "Longformer"),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_class(model_type):
    import importlib

    if model_type not in FAMILIES:
        raise ValueError(f"no llmkit model for model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[model_type]
    return getattr(importlib.import_module(f"llmkit.models.{module}"), name)


def read_model_type(path) -> str:
    """The model_type of a checkpoint directory's config.json, with a clear error for each way it can fail."""
    from .hf_io import CONFIG_NAME, _load_json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a Hugging Face checkpoint directory)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory (expected a Hugging Face checkpoint directory)")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME} (expected a Hugging Face checkpoint directory)")
    config = _load_json(config_file, "config.json (JSON)")
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    if "model_type" not in config:
        raise ValueError(f"{config_file} has no model_type (supported: {', '.join(sorted(FAMILIES))})")
    return config["model_type"]


def load_model(path, dtype=None, device=None):
    """An llmkit model (eval mode) from a Hugging Face checkpoint directory (family from config.json)."""
    return model_class(read_model_type(path)).from_pretrained(path, dtype=dtype, device=device)


def _list(args) -> int:
    import importlib

    import torch

    from .common import format_count

    print(f"{'family':<11} {'preset':<18} {'parameters':>11}")
    for module_name, (config_name, class_name) in PRESET_TABLES.items():
        module = importlib.import_module(f"llmkit.models.{module_name}")
        presets = getattr(getattr(module, config_name), "PRESETS", {})
        cls = getattr(module, class_name)
        for name in presets:
            with torch.device("meta"):  # count without allocating 100M+ parameters
                model = cls.from_preset(name)
            print(f"{class_name:<11} {name:<18} {format_count(model.num_parameters()):>11}")
    return 0


def _info(args) -> int:
    from .common import format_count

    model = load_model(args.path, device=resolve_device(args.device))
    param = next(model.parameters())
    path = Path(args.path)
    tokenizer = "tokenizer.json" if (path / "tokenizer.json").is_file() else "none"
    print(f"{type(model).__name__} from {args.path}: {format_count(model.num_parameters())} parameters, "
          f"{str(param.dtype).removeprefix('torch.')} on {param.device}; tokenizer: {tokenizer}")
    print(model.config)
    return 0


def _parse_ids(prompts: list[str]) -> list[list[int]]:
    out = []
    for prompt in prompts:
        try:
            ids = [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError(f"--ids: prompt {prompt!r} is not space-separated integer token ids") from None
        if not ids:
            raise ValueError("--ids: an empty prompt; give at least one token id")
        out.append(ids)
    return out


def _generate(args) -> int:
    import time

    from ..data.tokenizer import Tokenizer
    from ..generation import stream
    from .gpt import GPT

    model_type = read_model_type(args.model)
    if model_class(model_type) is not GPT:
        raise ValueError(f"{args.model} holds a {model_type} model; llmkit generate takes decoder-only checkpoints "
                         "(gpt2, llama, mistral, qwen2)")
    tokenizer = None
    if args.ids:
        prompts = _parse_ids(args.prompts)
    else:
        tokenizer_path = Path(args.tokenizer) if args.tokenizer else Path(args.model)
        if not (tokenizer_path / "tokenizer.json").is_file() and not tokenizer_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tokenizer_path}; pass --tokenizer, "
                                    "or --ids to give prompts as token ids")
        tokenizer = Tokenizer.from_file(tokenizer_path)
        prompts = list(args.prompts)
    model = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    # stream() checks every argument before the first token (nan / out-of-range values raise here).
    events = stream(model, prompts, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                    do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, stop_strings=args.stop or None, seed=args.seed,
                    eos_token_id=[] if args.ignore_eos else None)
    start = time.perf_counter()
    count = 0
    pieces = [[] for _ in prompts]
    for event in events:
        count += 1
        piece = event.text if tokenizer is not None else f"{event.token_id} "
        if len(prompts) == 1:  # one prompt: the text as it comes
            print(piece, end="", flush=True)
            continue
        # Several: their tokens arrive interleaved, step by step; each line is printed when its sequence ends.
        pieces[event.index].append(piece)
        if event.finish_reason is not None:
            print(f"[{event.index}] " + "".join(pieces[event.index]).rstrip().replace("\n", " "), flush=True)
    seconds = time.perf_counter() - start
    if len(prompts) == 1:
        print()
    rate = f"{count / seconds:.1f} tokens/s" if seconds > 0 else "-"
    print(f"({count} tokens in {seconds:.2f} s, {rate})", file=sys.stderr)
    return 0


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="presets with parameter counts").set_defaults(models_handler=_list)
    info = actions.add_parser("info", help="load a Hugging Face checkpoint directory and describe it")
    info.add_argument("path", help="checkpoint directory (config.json + weights)")
    add_device_argument(info, default="cpu", help="where to load the model: cpu (default), cuda, cuda:N or auto")
    info.set_defaults(models_handler=_info)


def _float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face checkpoint directory (gpt2 / llama / mistral / qwen2)")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the model directory)")
    parser.add_argument("--ids", action="store_true", help="prompts are space-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=_float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=_float, default=1.0)
    parser.add_argument("--repetition-penalty", type=_float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="always make --max-new-tokens tokens")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights' dtype (default: auto, the checkpoint's)")
    add_device_argument(parser)


def run_models(args) -> int:
    return args.models_handler(args)


def run_generate(args) -> int:
    return _generate(args)
