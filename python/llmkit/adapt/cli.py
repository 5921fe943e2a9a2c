"""`llmkit adapter info|merge`: inspect a PEFT adapter directory, merge one into a model.

    llmkit adapter info ADAPTER_DIR
    llmkit adapter merge --model MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR

MODEL_DIR is a local transformers model directory (config.json + weights;
nothing is downloaded); the merged model is written with
``save_pretrained`` (safetensors), loadable by transformers without llmkit or
PEFT (PEFT's ``merge_and_unload`` + ``save_pretrained``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    info = commands.add_parser("info", help="print an adapter's config and tensors")
    info.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge = commands.add_parser("merge", help="merge a LoRA adapter into a model directory and save the result")
    merge.add_argument("--model", required=True, help="local transformers model directory")
    merge.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT's format)")
    merge.add_argument("--out", required=True, help="directory for the merged model")


def adapter_info(directory: str) -> dict:
    """The config essentials and tensor inventory of an adapter directory (LoRA or prompt tuning)."""
    from safetensors import safe_open

    config_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no adapter_config.json in {directory!r} (not a PEFT adapter directory)")
    with open(config_path) as f:
        config = json.load(f)
    weights = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory!r}")
    tensors = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            tensors[key] = {"shape": list(t.get_shape()), "dtype": t.get_dtype()}
    params = 0
    for t in tensors.values():
        n = 1
        for d in t["shape"]:
            n *= d
        params += n
    keys = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
            "num_virtual_tokens", "token_dim", "prompt_tuning_init", "base_model_name_or_path")
    return {"config": {k: config[k] for k in keys if k in config}, "parameters": params, "tensors": len(tensors),
            "first_tensors": dict(list(tensors.items())[:6])}


def merge_adapter(model_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Load the model in `model_dir`, merge the LoRA adapter of `adapter_dir`, save to `out_dir`."""
    import transformers

    from .lora import merge_lora
    from .peft_format import load_adapter, read_adapter_config

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {model_dir!r} (a local transformers model directory is needed)")
    read_adapter_config(adapter_dir)  # a clear error for a non-LoRA adapter before the model loads
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
                       transformers.AutoModel)
    model = model_class.from_pretrained(model_dir)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    model.save_pretrained(out_dir)
    return type(model).__name__


def run(args: argparse.Namespace) -> int:
    try:
        if args.adapter_command == "info":
            print(json.dumps(adapter_info(args.adapter), indent=2))
        else:
            name = merge_adapter(args.model, args.adapter, args.out)
            print(f"merged {args.adapter} into {name} from {args.model}; saved to {args.out}")
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        print(f"llmkit adapter: {err}", file=sys.stderr)
        return 2
    return 0
