"""LoRA adapters on disk in PEFT's format, both ways.

An adapter directory holds ``adapter_config.json`` (the fields of PEFT's
``LoraConfig``, ``peft_type: "LORA"``) and ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module path>.lora_A.weight`` /
``...lora_B.weight`` (the adapter name of the in-memory
``lora_A.<name>.weight`` is dropped). As PEFT's ``save_pretrained``, the
adapter named ``"default"`` goes to the directory itself and every other
adapter to ``<directory>/<adapter_name>/``. So
``peft.PeftModel.from_pretrained(base, dir)`` loads what :func:`save_adapter`
writes (``PeftModel.load_adapter(dir / name, adapter_name=name)`` the
others), and :func:`load_adapter` loads what PEFT writes.

A save is atomic as a whole: every file of every adapter is written into a
temporary directory that replaces `directory` in one step
(:func:`llmkit.utils.atomic_directory`; the user's other files there are kept).
Whenever the saving process dies, the directory holds the previous save or the
new one, never new weights beside an old config. Loading checks that config
and weights agree (module names, rank, shapes) and says what differs.

Only plain LoRA is read: DoRA, LoRA biases, per-module rank/alpha patterns,
``modules_to_save`` and other PEFT features are refused with an error that
names them.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..nn.lora import LoraLinear, check_adapter_name
from ..utils import atomic_directory, recover_directory
from .config import LoraConfig, as_lora_config
from .lora import _state, add_adapter, apply_lora, find_target_modules, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became the default
PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config of each adapter: what apply_lora recorded, or (LoraLinear layers put in
    by hand) one inferred from the layers, which must then agree on their settings."""
    state = _state(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply_lora first)")
    if state is not None:
        return dict(state.configs)
    names = sorted({name for layer in layers.values() for name in layer.lora_A})
    configs = {}
    for adapter in names:
        holders = {n: layer for n, layer in layers.items() if adapter in layer.lora_A}
        settings = {n: (layer.r[adapter], layer.lora_alpha[adapter], layer.lora_dropout[adapter],
                        layer.use_rslora[adapter]) for n, layer in holders.items()}
        first = next(iter(settings.values()))
        for n, got in settings.items():
            if got != first:
                raise ValueError(f"adapter {adapter!r}: LoRA layers differ in (r, lora_alpha, lora_dropout, "
                                 f"use_rslora): {n} has {got}, others {first}; PEFT's format needs one setting")
        configs[adapter] = LoraConfig(r=first[0], lora_alpha=first[1], lora_dropout=first[2], use_rslora=first[3],
                                      target_modules=list(holders),
                                      fan_in_fan_out=any(layer.fan_in_fan_out for layer in holders.values()))
    return configs


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` under PEFT's file keys
    (``base_model.model.<path>.lora_A.weight``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply_lora first)")
    holders = lora_layers(model, adapter_name)
    if not holders:
        names = sorted({n for layer in layers.values() for n in layer.lora_A})
        raise ValueError(f"{type(model).__name__} has no adapter {adapter_name!r} (adapters: {names})")
    tensors = {}
    for name, layer in holders.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
    return tensors


def adapter_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, base_model_name_or_path: str | None = None,
                   task_type: str | None = None) -> dict:
    """PEFT's ``adapter_config.json`` fields for adapter `adapter_name` of `model`."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"{type(model).__name__} has no adapter {adapter_name!r} (adapters: {list(configs)})")
    out = configs[adapter_name].to_dict()
    if base_model_name_or_path is None:
        base_model_name_or_path = out.get("base_model_name_or_path") or \
            getattr(getattr(model, "config", None), "name_or_path", None) or None
    out.update({
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type if task_type is not None else out.get("task_type"),
        "inference_mode": True,  # what PEFT writes: a saved adapter loads frozen unless asked otherwise
    })
    return dict(sorted(out.items()))


def save_adapter(model: nn.Module, directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
    """Write the LoRA adapters of `model` to `directory` in PEFT's format (``save_pretrained``).

    Args:
        selected_adapters: names to save (default all). ``"default"`` goes to
            `directory`, each other name to ``directory/<name>/``.
        base_model_name_or_path, task_type: recorded in the config (default:
            the adapter's config, the model's ``config.name_or_path``).

    Atomic as a whole: see the module docstring. Files of `directory` that the
    save does not write are kept, except a stale ``adapter_model.bin``.
    """
    from safetensors.torch import save as safetensors_save

    configs = _configs(model)
    if selected_adapters is None:
        selected_adapters = list(configs)
    elif isinstance(selected_adapters, str) or not all(isinstance(n, str) for n in selected_adapters):
        raise TypeError(f"selected_adapters must be a list of adapter names, got {selected_adapters!r}")
    missing = [n for n in selected_adapters if n not in configs]
    if missing or not selected_adapters:
        raise ValueError(f"selected_adapters {selected_adapters!r}: {type(model).__name__} has adapters "
                         f"{list(configs)}")
    # Everything is serialised in memory first: a failure here leaves `directory` untouched.
    blobs = {}
    for name in selected_adapters:
        tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
        config = adapter_config(model, name, base_model_name_or_path, task_type)
        blobs[name] = (safetensors_save(tensors, metadata={"format": "pt"}),
                       json.dumps(config, indent=2, sort_keys=True) + "\n")
    with atomic_directory(directory, discard=(LEGACY_WEIGHTS_NAME,)) as tmp:
        for name, (weights, config) in blobs.items():
            out = tmp if name == DEFAULT_ADAPTER else tmp / name
            out.mkdir(exist_ok=True)
            (out / WEIGHTS_NAME).write_bytes(weights)
            (out / CONFIG_NAME).write_text(config)


def read_config_json(directory: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of `directory` as a dict, of any PEFT type;
    FileNotFoundError / ValueError say what is missing or malformed (and
    where named adapters are, when the directory holds only those)."""
    directory = os.fspath(directory)
    recover_directory(directory)  # a save killed mid-way (two-rename fallback) is put back first
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        kind = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(f"adapter directory {directory!r} {kind}")
    if not os.path.isfile(path):
        subdirs = named_adapter_dirs(directory)
        hint = f"; named adapters are in its sub-directories {subdirs}" if subdirs else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r} (not a PEFT adapter directory{hint})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


def named_adapter_dirs(directory: str | os.PathLike) -> list[str]:
    """The sub-directories of `directory` that hold an adapter (PEFT saves named adapters there)."""
    return sorted(e for e in os.listdir(directory) if os.path.isfile(os.path.join(directory, e, CONFIG_NAME)))


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of `directory` as a dict, checked to be a LoRA
    config llmkit implements (NotImplementedError names the PEFT features it is not)."""
    config = read_config_json(directory)
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path} is a {peft_type!r} adapter; load_adapter reads LORA adapters"
                         + (" (load_prompt reads PROMPT_TUNING)" if peft_type == "PROMPT_TUNING" else ""))
    try:
        as_lora_config(config)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}")


def _parse_key(key: str) -> tuple[str, str]:
    """``base_model.model.<path>.lora_A.weight`` -> (path, "lora_A"); PEFT's older
    in-file spelling with the adapter name (``lora_A.default.weight``) is refused."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for which in ("lora_A", "lora_B"):
        suffix = f".{which}.weight"
        if body.endswith(suffix):
            return body[: -len(suffix)], which
    raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B weight; load_adapter reads plain LoRA adapters")


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    from ..nn.linear4bit import Linear4bit, dense_weight

    if isinstance(module, Linear4bit):
        return module.in_features, module.out_features
    out_f, in_f = dense_weight(module).shape
    return in_f, out_f


def check_adapter_files(model: nn.Module, directory: str, config: LoraConfig,
                        tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Check that config, weights and model agree; returns the tensors by module name.

    The file's modules must be exactly those the config's target_modules select
    in `model`, each with an A of shape (r, in_features) and a B of shape
    (out_features, r), r the config's. Every failure names what differs."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, which = _parse_key(key)
        found.setdefault(name, {})[which] = value
    try:
        targets = find_target_modules(model, config.target_modules, config.exclude_modules)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the adapter in {directory!r} does not fit {type(model).__name__}: {exc}") from None
    extra = sorted(set(found) - set(targets))
    if extra:
        raise ValueError(f"the adapter in {directory!r} has tensors for {extra[:4]}{' ...' if len(extra) > 4 else ''}, "
                         f"which its target_modules {config.target_modules!r} do not select in "
                         f"{type(model).__name__} (selected: {targets[:4]}{' ...' if len(targets) > 4 else ''}): "
                         "a different model, or config and weights from different saves")
    for name in targets:
        in_f, out_f = _dims(model.get_submodule(name))
        for which, shape in (("lora_A", (config.r, in_f)), ("lora_B", (out_f, config.r))):
            key = f"{PREFIX}{name}.{which}.weight"
            if which not in found.get(name, {}):
                raise ValueError(f"the adapter in {directory!r} has no {key} for the target module {name}: "
                                 "config and weights disagree (weights from another save or model)")
            got = tuple(found[name][which].shape)
            if got != shape:
                rank = got[0] if which == "lora_A" else got[-1]
                why = (f"the config says r={config.r} but the tensor has rank {rank}" if len(got) == 2 and
                       rank != config.r else f"the model's {name} is {in_f} -> {out_f}")
                raise ValueError(f"shape mismatch for {key}: the adapter has {got}, expected {shape} ({why})")
    return found


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                 is_trainable: bool = False) -> nn.Module:
    """Load the PEFT LoRA adapter in `directory` into `model` as `adapter_name`; returns `model`.

    As PEFT: a model without LoRA gets it applied from the config and the
    adapter becomes active (``PeftModel.from_pretrained``); a model with LoRA
    gets it as one more adapter, not active (``PeftModel.load_adapter``;
    :func:`set_adapter` switches) -- or, if it already has an adapter of that
    name with the same rank and scaling, new weights in it. ``is_trainable``
    False (PEFT's default) loads the adapter frozen, for inference.

    `directory` is the adapter's own directory (for a named adapter that PEFT
    saved beside the default one: ``<dir>/<name>``). Raises FileNotFoundError
    (no directory, config or weights), ValueError (config, weights and model
    disagree: the message names the key, shapes, rank or modules) and
    NotImplementedError (PEFT features llmkit does not implement).
    """
    directory = os.fspath(directory)
    check_adapter_name(adapter_name)
    config = as_lora_config(read_adapter_config(directory))
    tensors = _read_weights(directory)
    found = check_adapter_files(model, directory, config, tensors)

    state = _state(model)
    existing = state is not None and adapter_name in state.configs
    if existing:
        for name, layer in lora_layers(model, adapter_name).items():
            if (layer.r[adapter_name], layer.scaling[adapter_name]) != (config.r, config.scaling()):
                raise ValueError(f"the model's adapter {adapter_name!r} at {name} has r={layer.r[adapter_name]}, "
                                 f"scaling={layer.scaling[adapter_name]:g}; the file has r={config.r}, lora_alpha="
                                 f"{config.lora_alpha}, use_rslora={config.use_rslora}")
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"adapter {adapter_name!r} is merged into {name}; unmerge() it before loading "
                                 "new weights")
        if set(lora_layers(model, adapter_name)) != set(found):
            raise ValueError(f"the model's adapter {adapter_name!r} is on {sorted(lora_layers(model, adapter_name))}, "
                             f"the file's on {sorted(found)}")
    elif state is not None or lora_layers(model):
        if state is None:
            raise ValueError(f"{type(model).__name__} has LoraLinear layers that apply_lora did not put there; "
                             "load into a model without LoRA, or apply_lora first")
        add_adapter(model, adapter_name, config)
    else:
        apply_lora(model, config, adapter_name=adapter_name)
    layers = lora_layers(model, adapter_name)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A[adapter_name].weight.copy_(found[name]["lora_A"])
            layer.lora_B[adapter_name].weight.copy_(found[name]["lora_B"])
    _state(model).configs[adapter_name].inference_mode = not is_trainable
    trainable = is_trainable and state.active == adapter_name
    for layer in layers.values():
        layer.lora_A[adapter_name].weight.requires_grad_(trainable)
        layer.lora_B[adapter_name].weight.requires_grad_(trainable)
    return model


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "adapter_config", "read_adapter_config",
           "check_adapter_files"]
