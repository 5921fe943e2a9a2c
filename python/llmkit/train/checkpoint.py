"""Training checkpoints: safetensors for tensors, JSON for everything else,
written so that a kill at any moment leaves the previous checkpoint usable.

Layout of ``OUT/checkpoints``::

    step-000200/model.safetensors      model weights (tied copies stored once)
    step-000200/optimizer.safetensors  AdamW moments and steps, by parameter name
    step-000200/rng.safetensors        every rank's torch (and CUDA) RNG state
    step-000200/trainer.json           step, schedule, data position, configs, optimizer groups
    latest                             the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, each file
fsync'ed, then renamed into place; only then is ``latest`` replaced
(atomically, with os.replace). A crash before that rename leaves ``latest``
pointing at the previous, complete checkpoint; leftovers are removed by
the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "llmkit-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (missing, incomplete, or from another model)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias name: stored name} for parameters shared under several names
    (a head tied to the embedding): safetensors stores each tensor once."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch.distributed.checkpoint's full optimizer state dict ->
    (tensors keyed "param_name::field", JSON-able rest)."""
    tensors, scalars = {}, {}
    for name, fields in state["state"].items():
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(rest["scalars"].items()):
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save(directory: Path, step: int, model_state: dict, optimizer_state: dict, rng_states: list[dict],
         meta: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under `directory` (rank 0 only) and point
    ``latest`` at it; keep the newest `keep` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # a save that was killed earlier
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _save_tensors(tmp / "model.safetensors", model_state)
        opt_tensors, opt_rest = flatten_optimizer_state(optimizer_state)
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        rng = {}
        for rank, states in enumerate(rng_states):
            for key, value in states.items():
                rng[f"rank{rank}.{key}"] = value
        _save_tensors(tmp / "rng.safetensors", rng)
        _write_json(tmp / "trainer.json", {"format": FORMAT, "version": VERSION, "step": step,
                                           "world_size": len(rng_states), "optimizer": opt_rest, **meta})
        _fsync_dir(tmp)
        final = directory / name
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    pointer = directory / f".latest-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, directory / "latest")
    _fsync_dir(directory)
    checkpoints = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in checkpoints[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load(path: Path) -> dict:
    """Read a checkpoint directory: {"meta", "model", "optimizer", "rng"}."""
    path = Path(path)
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable llmkit checkpoint: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an llmkit training checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}, this llmkit reads {VERSION}")
    try:
        model = load_file(str(path / "model.safetensors"))
        optimizer = unflatten_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta.pop("optimizer"))
        rng_flat = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: a checkpoint file is missing or damaged: {err}") from None
    rng: dict[int, dict] = {}
    for key, value in rng_flat.items():
        rank, name = key.split(".", 1)
        rng.setdefault(int(rank[4:]), {})[name] = value
    return {"meta": meta, "model": model, "optimizer": optimizer, "rng": rng, "path": path}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Fields where two model configs (as dicts) differ, for the error message."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, this model {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
