"""Hugging Face checkpoint directories, read and written for every model family.

What a family gets from here (its file only holds its name mapping):

- :class:`PretrainedIO`, the mixin that gives a family transformers' two
  methods with one signature for all families::

      Family.from_pretrained(path_or_hf_model, dtype=None, device=None, **config_overrides)
      model.save_pretrained(directory, tokenizer=None, safe_serialization=True, max_shard_size="50GB")

  (``from_hf`` / ``to_hf`` are the same methods under their older names).
  A family implements ``_from_hf_parts(hf_config, state, overrides)`` and
  ``_to_hf_parts()``.
- Loading (:func:`load_hf_checkpoint`): a transformers model object, or a local
  directory with ``config.json`` and the weights as ``model.safetensors``, a
  sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or a sharded
  ``pytorch_model.bin.index.json``. Nothing is downloaded. ``.bin`` files are
  read with ``torch.load(weights_only=True)`` (no code runs). A shard index is
  a small text file that names other files: a name that is absolute, holds
  ``..`` or a directory part, or is a symlink resolving outside the checkpoint
  directory is refused (a Hugging Face cache snapshot, whose files link into
  the repository's ``blobs/``, is the one allowed exception). A truncated or
  corrupt file, a config.json that is not JSON, a missing file: a ValueError /
  FileNotFoundError that names the file.
- Key checks both ways (:func:`check_keys`): a checkpoint weight the model does
  not use (the config says 2 layers, the weights have 12) or a model weight
  the checkpoint lacks is an error listing a summary of them; only keys that
  transformers also ignores (non-persistent buffers such as GPT-2's
  ``attn.bias``, tied copies such as a tied ``lm_head.weight``) and weights of
  another architecture's head (loading a bare encoder from a masked-LM
  checkpoint) are let through, the latter with a log message.
- ``dtype``: None or ``"auto"`` (transformers 5's default) takes the config's
  ``dtype`` / ``torch_dtype``, else the checkpoint's floating dtype; a torch
  dtype or its name (``"bfloat16"``) casts to it. Non-persistent float
  buffers (RoPE's inverse frequencies) stay float32, as in transformers.
- Saving (:func:`save_hf_checkpoint`): config.json, the weights (safetensors,
  sharded above ``max_shard_size`` as transformers names the shards; or
  ``pytorch_model.bin`` with ``safe_serialization=False``) and the tokenizer
  when given, all written as one unit with
  :func:`llmkit.utils.atomic_directory`: a reader sees the previous save or
  the new one, never a mix; the user's other files in the directory are kept,
  weight files of a previous save are not. Files get the modes the umask
  gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..utils import atomic_directory, get_logger, recover_directory

logger = get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's default

# Files of a previous save that must not survive a new one (a smaller model leaves fewer shards).
WEIGHT_FILE_PATTERNS = (WEIGHTS_NAME, "model-*-of-*.safetensors", INDEX_NAME,
                        TORCH_WEIGHTS_NAME, "pytorch_model-*-of-*.bin", TORCH_INDEX_NAME)
# Files a tokenizer save writes (transformers' and llmkit's): replaced as a set when a tokenizer is saved.
TOKENIZER_FILE_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                           "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model",
                           "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


# ------------------------------------------------------------------------------------------- loading

def _load_json(path: Path, what: str):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a valid {what}: not UTF-8 text ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a valid {what}: {err}") from None


def _hub_blobs(directory: Path) -> Path | None:
    """The repository's blobs/ of a Hugging Face cache snapshot directory (.../snapshots/REV), else None."""
    if directory.parent.name == "snapshots":
        blobs = directory.parent.parent / "blobs"
        if blobs.is_dir():
            return blobs.resolve()
    return None


def _shard_path(directory: Path, name, index_file: Path) -> Path:
    """The file a shard index names, refused unless it lies in the checkpoint directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index_file}: weight_map values must be file names, got {name!r}")
    if os.path.isabs(name) or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
        raise ValueError(f"{index_file} names the shard {name!r}, which is not a plain file name in the checkpoint "
                         "directory: refused (an index may only name files beside it)")
    path = directory / name
    if path.is_symlink():
        target = path.resolve()
        root = directory.resolve()
        blobs = _hub_blobs(directory)
        if not (target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs))):
            raise ValueError(f"{index_file} names the shard {name!r}, a symlink to {target} outside the checkpoint "
                             "directory: refused")
    if not path.is_file():
        raise FileNotFoundError(f"{index_file} names the shard {name!r}, which is not in {directory}")
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors' SafetensorError: truncated file, bad header
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {err}") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a loadable PyTorch weights file (corrupt, or it holds more than tensors, "
                         f"which weights_only loading refuses): {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (names -> tensors)")
    return state


def _read_index(directory: Path, index_file: Path, read) -> dict[str, torch.Tensor]:
    index = _load_json(index_file, "shard index (JSON)")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no weight_map (tensor name -> shard file)")
    shards = {name: _shard_path(directory, name, index_file) for name in sorted(set(weight_map.values()))}
    state: dict[str, torch.Tensor] = {}
    for name, path in shards.items():
        state.update(read(path))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise ValueError(f"{index_file} maps {len(absent)} tensors to shards that do not hold them, "
                         f"e.g. {absent[:3]}")
    return state


def load_hf_checkpoint(model_or_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a transformers model object or a local checkpoint directory."""
    if hasattr(model_or_dir, "state_dict") and hasattr(model_or_dir, "config") \
            and hasattr(model_or_dir.config, "to_dict"):
        config = model_or_dir.config.to_dict()
        return config, {k: v.detach() for k, v in model_or_dir.state_dict().items()}
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError("expected a transformers model object or a local checkpoint directory, "
                        f"got {type(model_or_dir).__name__}")
    directory = Path(model_or_dir)
    if not directory.exists():
        recover_directory(directory)  # a save killed between its two renames
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist (llmkit loads local checkpoint directories; "
                                "nothing is downloaded)")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory: give the checkpoint directory "
                                 f"(the one holding {CONFIG_NAME})")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME} (expected a Hugging Face checkpoint directory)")
    config = _load_json(config_path, "config.json (JSON)")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    if (directory / WEIGHTS_NAME).is_file():
        state = _read_safetensors(directory / WEIGHTS_NAME)
    elif (directory / INDEX_NAME).is_file():
        state = _read_index(directory, directory / INDEX_NAME, _read_safetensors)
    elif (directory / TORCH_WEIGHTS_NAME).is_file():
        state = _read_torch(directory / TORCH_WEIGHTS_NAME)
    elif (directory / TORCH_INDEX_NAME).is_file():
        state = _read_index(directory, directory / TORCH_INDEX_NAME, _read_torch)
    else:
        raise FileNotFoundError(f"{directory} has no weights ({WEIGHTS_NAME}, {INDEX_NAME}, {TORCH_WEIGHTS_NAME} "
                                f"or {TORCH_INDEX_NAME})")
    return config, state


# ---------------------------------------------------------------------------------------- key checks

def summarize_keys(keys: Iterable[str], limit: int = 6) -> str:
    """A short listing of tensor names: names that differ only in their first number are one entry,
    ``transformer.h.{2..11}.* (120 tensors)``."""
    groups: dict[str, list] = {}
    for key in sorted(keys):
        m = re.search(r"\.(\d+)\.", key)
        if m:
            head = key[:m.start()]
            entry = groups.setdefault(head + ".{}.*", [set(), 0, key])
            entry[0].add(int(m.group(1)))
            entry[1] += 1
        else:
            groups.setdefault(key, [set(), 1, key])
    parts = []
    for pattern, (numbers, count, first) in groups.items():
        if count == 1:
            parts.append(first)
        elif numbers:
            lo, hi = min(numbers), max(numbers)
            span = str(lo) if lo == hi else (f"{lo}..{hi}" if len(numbers) == hi - lo + 1
                                             else ",".join(map(str, sorted(numbers))))
            parts.append(pattern.replace("{}", "{" + span + "}") + f" ({count} tensors)")
        else:
            parts.append(pattern)
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f", and {more} more" if more > 0 else "")


def check_keys(owner: str, expected: Iterable[str], present: Iterable[str], *, benign: Iterable[str] = (),
               in_body: Callable[[str], bool] = lambda key: True, optional: Iterable[str] = (),
               config_hint: str = "", shown_as: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's tensor names with the ones a model needs.

    expected: the checkpoint names the model reads; present: the checkpoint's;
    benign: regular expressions (``re.search``) of names transformers ignores
    too; in_body(name): whether an unused name belongs to the part of the
    architecture the model has (an error) rather than another architecture's
    head (logged and ignored); optional: expected names that may be missing
    (a new head, initialised by the caller); shown_as: the names to print
    (the checkpoint's own spelling when the caller compares normalized names).
    Returns (missing optional names, ignored names); raises a ValueError on
    missing required names or unused names of the body.
    """
    expected, present = set(expected), set(present)
    benign_res = [re.compile(p) for p in benign]
    optional = set(optional)
    missing = expected - present
    unused = {k for k in present - expected if not any(r.search(k) for r in benign_res)}
    body_unused = sorted(k for k in unused if in_body(k))
    foreign = sorted(unused - set(body_unused))
    required_missing = sorted(missing - optional)
    if shown_as:
        body_unused = [shown_as.get(k, k) for k in body_unused]
        required_missing = [shown_as.get(k, k) for k in required_missing]
        foreign = [shown_as.get(k, k) for k in foreign]
    if required_missing or body_unused:
        problems = []
        if body_unused:
            problems.append(f"{len(body_unused)} checkpoint weights are not used by the model: "
                            f"{summarize_keys(body_unused)}")
        if required_missing:
            problems.append(f"{len(required_missing)} weights of the model are missing from the checkpoint: "
                            f"{summarize_keys(required_missing)}")
        hint = f" ({config_hint})" if config_hint else ""
        raise ValueError(f"{owner}: the checkpoint does not match its config{hint}: " + "; ".join(problems)
                         + ". Check config.json against the weights (a truncated or edited config?)")
    if foreign:
        logger.warning("%s: ignoring %d checkpoint weights of another architecture's head: %s",
                       owner, len(foreign), summarize_keys(foreign))
    return sorted(missing & optional), foreign


def assign_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], owner: str,
                   skip: Iterable[str] = (), checkpoint_names: dict[str, str] | None = None) -> None:
    """Copy `weights` (the model's own state_dict names) into the model, checking every shape first.

    skip: names left as initialised (new heads); checkpoint_names: ours -> the
    checkpoint's, for the messages."""
    ours = model.state_dict()
    skip = set(skip)
    unknown = sorted(set(weights) - set(ours))
    if unknown:  # a bug of the family's name mapping, not of the checkpoint
        raise RuntimeError(f"{owner}: the name mapping produced unknown parameters {unknown[:5]}")
    absent = sorted(set(ours) - set(weights) - skip)
    if absent:
        raise ValueError(f"{owner}: no checkpoint weights for {summarize_keys(absent)}")
    shown = checkpoint_names or {}
    bad = [f"{shown.get(name, name)} {tuple(t.shape)} in the checkpoint, {tuple(ours[name].shape)} for the config"
           for name, t in sorted(weights.items()) if tuple(t.shape) != tuple(ours[name].shape)]
    if bad:
        raise ValueError(f"{owner}: weight shapes do not match the config: {'; '.join(bad[:4])}"
                         + (f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""))
    with torch.no_grad():
        for name, tensor in weights.items():
            ours[name].copy_(tensor)


# ------------------------------------------------------------------------------------- dtype, device

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def resolve_dtype(dtype, hf_config: dict | None = None, state: dict | None = None,
                  from_object: bool = False) -> torch.dtype:
    """The floating dtype to load as: a torch dtype, its name, or None / "auto" (the checkpoint's)."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        found = None
        if hf_config is not None and not from_object:
            found = hf_config.get("dtype") or hf_config.get("torch_dtype")
        if found is None and state:
            found = next((t.dtype for t in state.values() if t.is_floating_point()), None)
        if found is None:
            return torch.float32
        return resolve_dtype(found)
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype) and candidate.is_floating_point:
            return candidate
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype; use a torch.dtype, "
                         f"'auto' or one of {list(_DTYPE_NAMES)}")
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    raise TypeError(f"dtype must be a torch.dtype, a name such as 'bfloat16', 'auto' or None; "
                    f"got {type(dtype).__name__}")


def cast_model(model: torch.nn.Module, dtype: torch.dtype, device=None) -> torch.nn.Module:
    """model.to(device, dtype), but non-persistent float buffers (derived constants such as RoPE's
    inverse frequencies) stay float32 as transformers keeps them."""
    kept = []
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                kept.append((module, name, buf))
    model.to(device=device, dtype=dtype)
    for module, name, buf in kept:
        module._buffers[name] = buf.to(device=device) if device is not None else buf
    return model


def apply_overrides(config, overrides: dict, owner: str):
    """dataclasses.replace(config, **overrides) with a clear error for an unknown field."""
    if not overrides:
        return config
    names = {f.name for f in dataclasses.fields(config) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{owner}: unknown config field(s) {unknown}; {type(config).__name__} fields are "
                        f"{sorted(names)}")
    return dataclasses.replace(config, **overrides)


# -------------------------------------------------------------------------------------------- saving

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes of an int or of transformers' strings ("50GB" = 50e9, "2GiB" = 2 * 2**30)."""
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int (bytes) or a string such as '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", size, re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r}: expected a number of bytes or e.g. '500MB', '5GB', '2GiB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"max_shard_size must be an int (bytes) or a string such as '5GB', got "
                        f"{type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _save_tokenizer(tokenizer, directory: Path) -> None:
    if hasattr(tokenizer, "backend") and hasattr(tokenizer, "save"):  # llmkit.data.tokenizer.Tokenizer
        tokenizer.save(directory)
    elif hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer
        tokenizer.save_pretrained(str(directory))
    else:
        raise TypeError("tokenizer must be an llmkit Tokenizer or a transformers tokenizer (with save_pretrained), "
                        f"got {type(tokenizer).__name__}")


def _tokenizer_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


def save_hf_checkpoint(directory, config: dict, state: dict[str, torch.Tensor], tokenizer=None,
                       safe_serialization: bool = True, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                       vocab_size: int | None = None) -> Path:
    """Write config.json, the weights and (optionally) the tokenizer into `directory`, atomically as a whole.

    Tensors are saved contiguous and unshared (safetensors refuses shared
    storage): leave tied copies out of `state` as transformers does.
    config gets ``dtype`` (the weights' floating dtype) as transformers writes it.
    """
    from ..utils.atomic import default_mode

    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be True or False, got {safe_serialization!r}")
    max_bytes = parse_size(max_shard_size)
    if tokenizer is not None:
        size = _tokenizer_size(tokenizer)
        if vocab_size is not None and size is not None and size > vocab_size:
            raise ValueError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}: "
                             "its top ids would be out of range; save the tokenizer the model was trained with")
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    floating = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    config = dict(config)
    if floating is not None:
        config["dtype"] = str(floating).removeprefix("torch.")
    shards = _shards(tensors, max_bytes)
    if safe_serialization:
        single, pattern, index_name = WEIGHTS_NAME, "model-{:05d}-of-{:05d}.safetensors", INDEX_NAME
    else:
        single, pattern, index_name = TORCH_WEIGHTS_NAME, "pytorch_model-{:05d}-of-{:05d}.bin", TORCH_INDEX_NAME
    discard = WEIGHT_FILE_PATTERNS + (TOKENIZER_FILE_PATTERNS if tokenizer is not None else ())
    directory = Path(directory)
    with atomic_directory(directory, discard=discard) as tmp:
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        names = [single] if len(shards) == 1 else [pattern.format(i + 1, len(shards)) for i in range(len(shards))]
        for name, shard in zip(names, shards):
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(shard, tmp / name, metadata={"format": "pt"})
            else:
                torch.save(shard, tmp / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            (tmp / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Every file of the artefact gets the mode a plain open() gives (some writers use mkstemp's 0600).
        mode = default_mode()
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                os.chmod(path, mode)
    return directory


# --------------------------------------------------------------------------------------- the mixin

class PretrainedIO:
    """``from_pretrained`` / ``save_pretrained`` (and ``from_hf`` / ``to_hf``) for a model family.

    A family implements::

        @classmethod
        def _from_hf_parts(cls, hf_config: dict, state: dict, overrides: dict) -> model  # float32, on the CPU
        def _to_hf_parts(self) -> tuple[dict, dict]                                    # (config, state)
    """

    @classmethod
    def from_pretrained(cls, path_or_hf_model, dtype=None, device=None, **config_overrides):
        """Load a transformers model object or a local checkpoint directory (nothing is downloaded).

        Args:
            path_or_hf_model: a directory with config.json + weights (safetensors,
                sharded or not, or pytorch_model.bin), or a transformers model.
            dtype: None / "auto" (the checkpoint's dtype, as transformers 5), a
                torch dtype or its name ("float32", "bfloat16", ...).
            device: where the model goes (default: the CPU).
            config_overrides: fields of the llmkit config to replace after
                reading the checkpoint's (``num_labels=3``, ``dropout=0.0``).

        Returns the model in eval mode, as transformers does. Raises a
        ValueError when the weights do not match the config (unused or
        missing weights, shapes).
        """
        hf_config, state = load_hf_checkpoint(path_or_hf_model)
        is_object = not isinstance(path_or_hf_model, (str, os.PathLike))
        target = resolve_dtype(dtype, hf_config, state, from_object=is_object)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                                 f"got {device!r}") from None
        model = cls._from_hf_parts(hf_config, state, dict(config_overrides))
        del state
        return cast_model(model, target, device).eval()

    def save_pretrained(self, directory, tokenizer=None, safe_serialization: bool = True,
                        max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write a directory transformers' ``from_pretrained`` (and llmkit's) loads.

        Args:
            directory: created if needed; saved as a whole, atomically; other
                files already there are kept, weight files of an earlier save
                are not.
            tokenizer: an llmkit ``Tokenizer`` or a transformers tokenizer, saved
                beside the weights (``Tokenizer.from_file(directory)`` and
                ``AutoTokenizer.from_pretrained(directory)`` read it back); its
                bos / eos / pad ids fill the config's where the model has none.
            safe_serialization: safetensors (default) or pytorch_model.bin.
            max_shard_size: bytes or a string such as "5GB": bigger checkpoints
                are sharded with an index, as transformers does.
        Returns the directory.
        """
        config, state = self._to_hf_parts()
        if tokenizer is not None:  # special ids the config leaves open come from the tokenizer saved with it
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(tokenizer, key, None)
                if config.get(key) is None and isinstance(value, int):
                    config[key] = value
        vocab = config.get("vocab_size")
        return save_hf_checkpoint(directory, config, state, tokenizer=tokenizer,
                                  safe_serialization=safe_serialization, max_shard_size=max_shard_size,
                                  vocab_size=vocab if isinstance(vocab, int) else None)

    from_hf = from_pretrained  # the older names
    to_hf = save_pretrained
