"""LoRA adapters on disk in PEFT's format, both ways.

A directory holds ``adapter_config.json`` (the fields of PEFT's ``LoraConfig``,
``peft_type: "LORA"``) and ``adapter_model.safetensors`` whose tensors are
named ``base_model.model.<module path>.lora_A.weight`` / ``...lora_B.weight``
(PEFT strips the adapter name, ``default``, from the in-memory
``lora_A.default.weight``). So ``peft.PeftModel.from_pretrained(base, dir)``
loads what :func:`save_adapter` writes, and :func:`load_adapter` loads what
``PeftModel.save_pretrained(dir)`` writes.

Only plain LoRA is read: DoRA, LoRA biases, per-module rank/alpha patterns and
``modules_to_save`` are refused with an error that names them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch
from torch import nn

from .lora import apply_lora, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became the default
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's file keys (``base_model.model.<path>.lora_A.weight``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply_lora first)")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    return tensors


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None,
                   task_type: str | None = None) -> dict:
    """PEFT's ``LoraConfig`` fields for the adapters of `model`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply_lora first)")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        got = (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora)
        want = (first.r, first.lora_alpha, first.lora_dropout, first.use_rslora)
        if got != want:
            raise ValueError(f"LoRA layers differ in (r, alpha, dropout, rslora): {name} has {got}, others {want}; "
                             "PEFT's format here needs one setting for all")
    settings = getattr(model, "llmkit_lora", None)
    target_modules = settings.target_modules if settings is not None else list(layers)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        # PEFT sets this for GPT-2's Conv1D (weights stored (in, out)); the
        # adapter tensors have the same shapes either way.
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _write_temp(directory: str, name: str, write) -> str:
    """Write via `write(path)` to a temp file in `directory` (the same file
    system, so os.replace is atomic) and fsync it; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> None:
    """Write the LoRA adapters of `model` to `directory` in PEFT's format.

    Both files are first written completely (and fsynced) to temp files in
    `directory`, then moved into place with ``os.replace``, which is atomic:
    an interrupted save leaves a previous adapter there intact, each file
    either old or new (only between the two renames can the new weights meet
    the old config). Temp files are removed on failure.
    """
    from safetensors.torch import save_file

    config = adapter_config(model, base_model_name_or_path, task_type)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)

    def write_config(path):
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    temps = []
    try:
        temps.append(_write_temp(directory, WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})))
        temps.append(_write_temp(directory, CONFIG_NAME, write_config))
        # Both files are complete: swap them in (each os.replace is atomic).
        os.replace(temps[0], os.path.join(directory, WEIGHTS_NAME))
        os.replace(temps[1], os.path.join(directory, CONFIG_NAME))
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of `directory`, checked to be plain LoRA."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r} (not a PEFT adapter directory)")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')!r} adapter; load_adapter reads LORA adapters")
    unsupported = {
        "use_dora": config.get("use_dora", False),
        "lora_bias": config.get("lora_bias", False),
        "bias": config.get("bias", "none") != "none" and config.get("bias"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "modules_to_save": config.get("modules_to_save"),
        "layers_to_transform": config.get("layers_to_transform"),
        "target_parameters": config.get("target_parameters"),
        "trainable_token_indices": config.get("trainable_token_indices"),
    }
    used = {k: v for k, v in unsupported.items() if v}
    if used:
        raise NotImplementedError(f"{path} uses LoRA features llmkit does not load: {used}")
    return config


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into `model`; returns `model`.

    If `model` has no LoRA layers yet, they are applied first from the
    config (target_modules, r, lora_alpha, lora_dropout, use_rslora). Every
    LoRA layer of the model must get both tensors from the file and every
    tensor in the file must have a layer; shapes must agree exactly.
    """
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    tensors = _read_weights(directory)
    r, alpha = config["r"], config["lora_alpha"]
    dropout, rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)

    layers = lora_layers(model)
    if not layers:
        apply_lora(model, target_modules=config["target_modules"], r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        layers = lora_layers(model)
    else:
        for name, layer in layers.items():
            if (layer.r, layer.scaling) != (r, _scaling(alpha, r, rslora)):
                raise ValueError(f"the model's LoRA layer {name} has r={layer.r}, scaling={layer.scaling:g}; the "
                                 f"adapter has r={r}, lora_alpha={alpha}, use_rslora={rslora}")
            if layer.merged:
                raise ValueError(f"LoRA layer {name} is merged; unmerge() it before loading new adapter weights")

    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, which = _parse_key(key)
        if name not in layers:
            raise ValueError(f"adapter tensor {key!r} has no LoRA layer {name!r} in {type(model).__name__} "
                             f"(LoRA layers: {sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''})")
        found.setdefault(name, {})[which] = value
    for name, layer in layers.items():
        for which in ("lora_A", "lora_B"):
            if which not in found.get(name, {}):
                raise ValueError(f"the adapter in {directory!r} has no {PREFIX}{name}.{which}.weight "
                                 f"for the model's LoRA layer {name}")
            value, param = found[name][which], getattr(layer, which)
            if value.shape != param.shape:
                raise ValueError(f"shape mismatch for {PREFIX}{name}.{which}.weight: the adapter has "
                                 f"{tuple(value.shape)}, the model {tuple(param.shape)}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(found[name]["lora_A"])
            layer.lora_B.copy_(found[name]["lora_B"])
    return model


def _scaling(alpha, r, rslora) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _parse_key(key: str) -> tuple[str, str]:
    """``base_model.model.<path>.lora_A.weight`` -> (path, "lora_A")."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for which in ("lora_A", "lora_B"):
        suffix = f".{which}.weight"
        if body.endswith(suffix):
            return body[: -len(suffix)], which
    raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B weight; load_adapter reads plain LoRA adapters")


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "adapter_config", "read_adapter_config"]
