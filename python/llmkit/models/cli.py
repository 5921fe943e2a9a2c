"""`llmkit models list|info` and `llmkit generate`.

    llmkit models list                 presets of every family, with parameter counts
    llmkit models info DIR             what a Hugging Face checkpoint directory holds, loaded into llmkit
    llmkit generate MODEL PROMPT ...   generate from a checkpoint directory (tokenizer.json beside it)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def model_class(model_type: str):
    import importlib

    if model_type not in FAMILIES:
        raise ValueError(f"no llmkit model for model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    module, name = FAMILIES[model_type]
    return getattr(importlib.import_module(f"llmkit.models.{module}"), name)


def load_model(path):
    """An llmkit model from a Hugging Face checkpoint directory (family from config.json)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face checkpoint directory)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    return model_class(model_type).from_hf(path)


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

    model = load_model(args.path)
    print(f"{type(model).__name__} from {args.path}: {format_count(model.num_parameters())} parameters")
    print(model.config)
    return 0


def _generate(args) -> int:
    from ..data.tokenizer import Tokenizer
    from ..generation import stream
    from .gpt import GPT

    model = load_model(args.model)
    if not isinstance(model, GPT):
        print(f"llmkit generate: {type(model).__name__} is not a decoder-only model", file=sys.stderr)
        return 2
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else Path(args.model)
    tokenizer = None
    if args.ids:
        prompts = [[int(t) for t in p.split()] for p in args.prompts]
    else:
        if not (tokenizer_path / "tokenizer.json").is_file() and not tokenizer_path.is_file():
            print(f"llmkit generate: no tokenizer.json at {tokenizer_path}; pass --tokenizer, "
                  "or --ids to give prompts as token ids", file=sys.stderr)
            return 2
        tokenizer = Tokenizer.from_file(tokenizer_path)
        prompts = list(args.prompts)
    import time

    start = time.perf_counter()
    count = 0
    last_index = None
    for event in stream(model, prompts, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, stop_strings=args.stop or None, seed=args.seed,
                        eos_token_id=[] if args.ignore_eos else None):
        count += 1
        if len(prompts) == 1:  # one prompt: print the text as it comes
            print(event.text if tokenizer is not None else f"{event.token_id} ", end="", flush=True)
        else:
            if event.index != last_index:
                print(f"\n[{event.index}] ", end="")
                last_index = event.index
            print(event.text if tokenizer is not None else f"{event.token_id} ", end="", flush=True)
    seconds = time.perf_counter() - start
    print(f"\n({count} tokens in {seconds:.2f} s, {count / seconds:.1f} tokens/s)", file=sys.stderr)
    return 0


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="presets with parameter counts").set_defaults(models_handler=_list)
    info = actions.add_parser("info", help="load a Hugging Face checkpoint directory and describe it")
    info.add_argument("path")
    info.set_defaults(models_handler=_info)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face checkpoint directory (gpt2 / llama / mistral / qwen2)")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the model directory)")
    parser.add_argument("--ids", action="store_true", help="prompts are space-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="always make --max-new-tokens tokens")


def run_models(args) -> int:
    return args.models_handler(args)


def run_generate(args) -> int:
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"llmkit generate: {err}", file=sys.stderr)
        return 2
