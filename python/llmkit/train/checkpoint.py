"""Training checkpoints: safetensors for tensors, JSON for everything else,
written so that a kill at any moment leaves the previous checkpoint usable.

Layout of ``OUT/checkpoints``::

    step-000200/model.safetensors      model weights (tied copies stored once)
    step-000200/optimizer.safetensors  AdamW moments and steps, by parameter name
    step-000200/rng.safetensors        every rank's torch (and CUDA) RNG state
    step-000200/trainer.json           step, schedule, data position, configs, optimizer groups,
                                       and the byte size of each file above (written last)
    latest                             the name of the newest complete checkpoint

A checkpoint directory is one atomic save (:func:`llmkit.utils.atomic_directory`:
written into a temporary sibling, every file fsync'ed, then swapped in whole);
only then is ``latest`` replaced (atomically). So a kill leaves ``latest``
naming a complete checkpoint.

Resuming trusts nothing: :func:`latest` checks the checkpoint ``latest``
names (trainer.json parses and is ours, every file is there with the size it
recorded, every safetensors header is readable) and, when it is not whole
(truncated by a full disk, a copy cut short, a file edited by hand), logs a
warning naming it and falls back to the newest complete checkpoint; with
none complete it raises :class:`CheckpointError`.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmkit.utils import atomic_directory, get_logger, write_text

FORMAT = "llmkit-train-checkpoint"
VERSION = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
_STEP_DIR = re.compile(r"step-(\d+)$")

_log = get_logger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (missing, incomplete, or from another model)."""


def _write_json(path: Path, value) -> None:
    # Inside the checkpoint's temporary directory: the directory as a whole is the atomic unit.
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


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
    ``latest`` at it; keep the newest `keep` checkpoints up to `step`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # What a killed save left (rank 0 is the only writer here): checkpoint temporaries (".tmp-*": older
    # llmkit), a temporary `latest`.
    for stale in list(directory.glob(".step-*.tmp-*")) + list(directory.glob(".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(".latest.*.tmp"):
        stale.unlink(missing_ok=True)
    name = f"step-{step:06d}"
    # A resumed run saving a step again replaces that checkpoint whole (keep_existing=False).
    with atomic_directory(directory / name, keep_existing=False) as tmp:
        _save_tensors(tmp / "model.safetensors", model_state)
        opt_tensors, opt_rest = flatten_optimizer_state(optimizer_state)
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        rng = {}
        for rank, states in enumerate(rng_states):
            for key, value in states.items():
                rng[f"rank{rank}.{key}"] = value
        _save_tensors(tmp / "rng.safetensors", rng)
        files = {file: (tmp / file).stat().st_size for file in TENSOR_FILES}
        _write_json(tmp / "trainer.json", {"format": FORMAT, "version": VERSION, "step": step,
                                           "world_size": len(rng_states), "optimizer": opt_rest,
                                           "files": files, **meta})
    final = directory / name
    write_text(directory / "latest", name + "\n")
    # Prune among the checkpoints up to this step only: those of later steps (a run
    # resumed from an older checkpoint) are replaced when the run reaches them.
    done = sorted((s, p) for s, p in _step_dirs(directory) if s <= step)
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step-N directories under `directory`."""
    found = []
    for path in Path(directory).glob("step-*"):
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return found


def _safetensors_size(path: Path) -> int:
    """The size a safetensors file must have, from its header (8-byte length, JSON, data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is {len(head)} bytes long (truncated)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20:
            raise CheckpointError(f"{path.name} has an implausible header length {length}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path.name} has an unreadable safetensors header ({err})") from None
    return 8 + length + end


def verify(path) -> dict:
    """Check that checkpoint directory `path` is complete; return its trainer.json.

    Raises :class:`CheckpointError` saying what is wrong: trainer.json missing,
    not JSON or not an llmkit checkpoint of this version; a tensor file
    missing, of another size than trainer.json recorded, or with a header
    that does not parse or that promises more bytes than the file holds.
    Reads headers only, never the tensors.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: trainer.json is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: trainer.json is not readable JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an llmkit training checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}, this llmkit reads {VERSION}")
    recorded = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    for name in TENSOR_FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if name in recorded and recorded[name] != size:
            raise CheckpointError(f"{path}: {name} is {size} bytes, trainer.json recorded {recorded[name]}")
        try:
            expected = _safetensors_size(file)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        if expected != size:
            raise CheckpointError(f"{path}: {name} is {size} bytes, its header describes {expected}")
    return meta


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None when there is none at all.

    The one ``latest`` names when it passes :func:`verify`; else (with a
    warning naming each checkpoint skipped and why) the newest step-N that
    passes. Raises :class:`CheckpointError` when checkpoints exist but none is
    complete.
    """
    directory = Path(directory)
    pointer = directory / "latest"
    named = None
    if pointer.is_file():
        try:
            named = directory / pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            named = None
    candidates = [p for _, p in sorted(_step_dirs(directory), reverse=True)]
    if named is not None and _STEP_DIR.match(named.name):
        candidates = [named] + [p for p in candidates if p != named]
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            verify(path)
        except CheckpointError as err:
            problems.append(str(err))
            _log.warning("skipping checkpoint %s: %s", path.name, err)
            continue
        if problems:
            _log.warning("resuming from %s, the newest complete checkpoint", path.name)
        return path
    raise CheckpointError(f"no complete checkpoint under {directory}: " + "; ".join(problems))


def load(path: Path) -> dict:
    """Read a checkpoint directory: {"meta", "model", "optimizer", "rng", "path"} (checked by :func:`verify`)."""
    path = Path(path)
    meta = verify(path)
    try:
        model = load_file(str(path / "model.safetensors"))
        optimizer = unflatten_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta.pop("optimizer"))
        rng_flat = load_file(str(path / "rng.safetensors"))
        rng: dict[int, dict] = {}
        for key, value in rng_flat.items():
            rank, name = key.split(".", 1)
            rng.setdefault(int(rank[4:]), {})[name] = value
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: a checkpoint file is damaged: {err}") from None
    meta.pop("files", None)
    return {"meta": meta, "model": model, "optimizer": optimizer, "rng": rng, "path": path}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Fields where two model configs (as dicts) differ, for the error message."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, this model {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
