"""Reading and writing Hugging Face checkpoints: config.json + safetensors.

Every model family's ``from_hf`` / ``to_hf`` goes through these two functions,
so the file handling (sharded checkpoints, tied weights, atomic writes) lives
in one place and the model files only hold their name mappings.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


def load_hf_checkpoint(model_or_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a transformers model object or a local directory.

    A directory needs config.json and the weights as model.safetensors, a
    sharded model.safetensors.index.json, or pytorch_model.bin (loaded with
    ``weights_only=True``). Nothing is downloaded.
    """
    if hasattr(model_or_dir, "state_dict") and hasattr(model_or_dir, "config"):
        config = model_or_dir.config.to_dict()
        return config, {k: v.detach() for k, v in model_or_dir.state_dict().items()}
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError("expected a transformers model object or a local checkpoint directory, "
                        f"got {type(model_or_dir).__name__}")
    directory = Path(model_or_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (llmkit loads local checkpoints only; "
                                "nothing is downloaded)")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    config = json.loads(config_path.read_text())
    from safetensors.torch import load_file

    if (directory / WEIGHTS_NAME).is_file():
        state = load_file(directory / WEIGHTS_NAME)
    elif (directory / INDEX_NAME).is_file():
        index = json.loads((directory / INDEX_NAME).read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(directory / shard))
    elif (directory / TORCH_WEIGHTS_NAME).is_file():
        state = torch.load(directory / TORCH_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has no weights ({WEIGHTS_NAME}, {INDEX_NAME} or {TORCH_WEIGHTS_NAME})")
    return config, state


def save_hf_checkpoint(directory, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into `directory` (created if needed).

    Each file is written to a temporary name and renamed into place, so an
    interrupted save never leaves a half-written file under the real name.
    Tensors are saved contiguous and unshared (safetensors refuses shared
    storage); leave tied copies out of `state` as transformers does.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(text))
    return directory


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
