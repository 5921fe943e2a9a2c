"""`llmkit adapter info|merge`: inspect a PEFT adapter directory, merge one into a model.

    llmkit adapter info ADAPTER_DIR
    llmkit adapter merge --model MODEL_DIR --adapter ADAPTER_DIR -o OUT_DIR [--device auto|cpu|cuda|cuda:N]

``info`` prints the config essentials and tensor inventory of a LoRA or
prompt-tuning adapter directory as JSON (named adapters that PEFT saved in
sub-directories are listed). ``merge`` loads the local transformers model
directory MODEL_DIR (config.json + weights; nothing is downloaded), merges
the LoRA adapter on DEVICE and writes the merged model with
``save_pretrained`` (safetensors) to OUT_DIR, atomically: loadable by
transformers without llmkit or PEFT (PEFT's ``merge_and_unload`` +
``save_pretrained``). ``--out`` is kept as an alias of ``-o/--output``.

User mistakes (a missing directory, a directory that is not an adapter, an
adapter for another model) raise FileNotFoundError / ValueError /
NotImplementedError with a message saying what is wrong; the ``llmkit``
command prints it as one line.
"""
from __future__ import annotations

import argparse
import json
import os

from ..utils import atomic_directory
from ..utils.cliargs import add_device_argument, add_output_argument, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    info = commands.add_parser("info", help="print an adapter's config and tensors as JSON")
    info.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge = commands.add_parser("merge", help="merge a LoRA adapter into a model directory and save the result")
    merge.add_argument("--model", required=True, help="local transformers model directory")
    merge.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT's format)")
    add_output_argument(merge, required=True, aliases=("--out",), help="directory for the merged model")
    add_device_argument(merge, help="where to merge: auto (CUDA when available), cpu, cuda or cuda:N "
                                    "(default: %(default)s)")


def _require_directory(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a directory")


def adapter_info(directory: str) -> dict:
    """The config essentials and tensor inventory of an adapter directory (LoRA or prompt tuning)."""
    from safetensors import SafetensorError, safe_open

    from .peft_format import named_adapter_dirs, read_config_json

    _require_directory(directory, "adapter directory")
    config, named = read_config_json(directory), named_adapter_dirs(directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory!r}")
    tensors = {}
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                tensors[key] = {"shape": list(t.get_shape()), "dtype": t.get_dtype()}
    except SafetensorError as exc:
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from None
    params = 0
    for t in tensors.values():
        n = 1
        for d in t["shape"]:
            n *= d
        params += n
    keys = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
            "num_virtual_tokens", "token_dim", "prompt_tuning_init", "base_model_name_or_path")
    out = {"config": {k: config[k] for k in keys if k in config}, "parameters": params, "tensors": len(tensors),
           "first_tensors": dict(list(tensors.items())[:6])}
    if named:
        out["named_adapters"] = named
    return out


def merge_adapter(model_dir: str, adapter_dir: str, out_dir: str, device: str = "cpu") -> str:
    """Load the model in `model_dir` on `device`, merge the LoRA adapter of `adapter_dir`,
    save to `out_dir` (atomically, the user's other files there kept); returns the model class name."""
    from .lora import merge_lora
    from .peft_format import load_adapter, read_adapter_config

    _require_directory(model_dir, "model directory")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {model_dir!r} (a local transformers model directory is needed)")
    _require_directory(adapter_dir, "adapter directory")
    read_adapter_config(adapter_dir)  # a clear error for a non-LoRA adapter before the model loads
    if os.path.realpath(out_dir) in (os.path.realpath(model_dir), os.path.realpath(adapter_dir)):
        raise ValueError(f"the output directory {out_dir!r} is the model or adapter directory; pick another one "
                         "(the merged weights would replace the base model's)")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("llmkit adapter merge needs transformers: pip install 'llmkit[hf]'") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        architectures = getattr(config, "architectures", None) or []
        model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
                           transformers.AutoModel)
        model = model_class.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load the transformers model in {model_dir!r}: {exc}") from None
    model.to(device)
    load_adapter(model, adapter_dir)  # ValueError naming the module / shape when the adapter is for another model
    merge_lora(model)
    # Weight files of an earlier save are not carried over: stale shards beside new weights would mix.
    with atomic_directory(out_dir, discard=("model*.safetensors", "model.safetensors.index.json",
                                            "pytorch_model*.bin", "pytorch_model.bin.index.json")) as tmp:
        model.save_pretrained(tmp)
    return type(model).__name__


def run(args: argparse.Namespace) -> int:
    if args.adapter_command == "info":
        print(json.dumps(adapter_info(args.adapter), indent=2))
    else:
        device = resolve_device(args.device)
        name = merge_adapter(args.model, args.adapter, args.output, device=device)
        print(f"merged {args.adapter} into {name} from {args.model} on {device}; saved to {args.output}")
    return 0
