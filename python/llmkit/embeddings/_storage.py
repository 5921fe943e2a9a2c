"""llmkit's native files for embeddings: one safetensors file per saved object.

``KeyedVectors.save``, ``Word2Vec.save`` and ``GloVe.save`` write one file
(gensim's user expectation: ``model.save("w2v.model")`` takes a file path):

- the arrays as safetensors tensors (vectors, output weights, counts, ...);
- the vocabulary as two tensors, ``<prefix>keys.utf8`` (the keys' UTF-8
  bytes, concatenated) and ``<prefix>keys.offsets`` (int64, n + 1 bounds),
  not as JSON in the header: safetensors refuses headers over 100 MB, which a
  vocabulary of a few million words would reach; integer keys are one int64
  tensor ``<prefix>keys.int``;
- everything else (the format name and version, every hyperparameter, the
  training counters) as JSON in the safetensors metadata, under ``"llmkit"``.

Files are written through :func:`llmkit.utils.atomic_write`: an interrupted
save leaves the previous file intact. Reading never unpickles: a gensim
``save()`` file (a pickle, which can run arbitrary code when loaded) is
refused with a message naming the ``from_gensim`` converters.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT_VERSION = 1
_META_KEY = "llmkit"
_PICKLE_HINT = {
    "KeyedVectors": "llmkit.embeddings.KeyedVectors.from_gensim(gensim.models.KeyedVectors.load(path))",
    "Word2Vec": "llmkit.embeddings.Word2Vec.from_gensim(gensim.models.Word2Vec.load(path))",
    "GloVe": "gensim has no GloVe model; GloVe.load reads the files GloVe.save writes",
}


def encode_keys(keys: list, prefix: str) -> tuple[dict[str, np.ndarray], str]:
    """The vocabulary as tensors, and its key type ("str" or "int")."""
    if all(isinstance(k, str) for k in keys):
        encoded = [k.encode("utf-8") for k in keys]
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return {f"{prefix}keys.utf8": data, f"{prefix}keys.offsets": offsets}, "str"
    if all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
        return {f"{prefix}keys.int": np.array(keys, dtype=np.int64)}, "int"
    kinds = sorted({type(k).__name__ for k in keys})
    raise ValueError(f"cannot save keys of types {', '.join(kinds)}: the native format stores either all-str "
                     "or all-int keys")


def decode_keys(tensors: dict[str, np.ndarray], prefix: str, key_type: str, fname) -> list:
    if key_type == "int":
        return [int(k) for k in _need(tensors, f"{prefix}keys.int", fname)]
    if key_type != "str":
        raise ValueError(f"{fname}: unknown key type {key_type!r} (damaged file)")
    data = _need(tensors, f"{prefix}keys.utf8", fname).tobytes()
    offsets = _need(tensors, f"{prefix}keys.offsets", fname)
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data) \
            or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{fname}: the vocabulary offsets do not match its bytes (damaged file)")
    try:
        return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError as err:
        raise ValueError(f"{fname}: a vocabulary key is not valid UTF-8 (damaged file): {err}") from None


def _need(tensors: dict[str, np.ndarray], name: str, fname) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"{fname}: tensor {name!r} is missing (damaged or truncated file)")
    return tensors[name]


def write(fname, kind: str, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Write `tensors` and the JSON `header` (plus format name and version) to `fname`, atomically."""
    from safetensors.numpy import save

    from llmkit.utils import atomic_write

    meta = {"format": f"llmkit.{kind}", "version": FORMAT_VERSION, **header}
    try:
        text = json.dumps(meta)  # NaN / inf (a diverged loss) are written as Python's json reads them
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot save {kind}: a setting is not JSON-serialisable ({err})") from None
    data = save({name: np.ascontiguousarray(t) for name, t in tensors.items()}, metadata={_META_KEY: text})
    with atomic_write(fname, "wb") as f:
        f.write(data)


def read(fname, kind: str, mmap: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, tensors) of an llmkit `kind` file; clear errors for anything else.

    ``mmap="r"`` maps the tensors read-only from the file instead of reading them."""
    from safetensors import safe_open

    if mmap not in (None, "r"):
        raise ValueError(f"mmap must be None or 'r' (read-only memory map), got {mmap!r}")
    fname = os.fspath(fname)
    if os.path.isdir(fname):
        raise IsADirectoryError(f"{fname} is a directory; {kind}.load takes the file that {kind}.save wrote")
    with open(fname, "rb") as f:  # FileNotFoundError / PermissionError as they are
        head = f.read(16)
    if head[:1] == b"\x80":
        advice = (f"if you trust the file, load it with gensim and convert: {_PICKLE_HINT[kind]}" if kind != "GloVe"
                  else _PICKLE_HINT[kind])
        raise ValueError(f"{fname} is a Python pickle (gensim's save() format), not an llmkit file; llmkit never "
                         f"unpickles (loading a pickle can run arbitrary code); {advice}")
    not_ours = (f"{fname} is not an llmkit {kind} file (expected a safetensors file written by {kind}.save; "
                "word2vec.c / GloVe text or binary vectors load with KeyedVectors.load_word2vec_format)")
    try:
        with safe_open(fname, framework="np") as st:
            metadata = st.metadata() or {}
            names = list(st.keys())
            tensors = {} if mmap else {name: st.get_tensor(name) for name in names}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any malformed header
        raise ValueError(f"{not_ours}: {err}") from None
    if _META_KEY not in metadata:
        raise ValueError(f"{not_ours}: a safetensors file without llmkit's metadata")
    try:
        header = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{fname}: llmkit metadata is not valid JSON (damaged file): {err}") from None
    found = header.get("format") if isinstance(header, dict) else None
    if found != f"llmkit.{kind}":
        other = found[len("llmkit."):] if isinstance(found, str) and found.startswith("llmkit.") else None
        hint = f"; load it with {other}.load" if other else ""
        raise ValueError(f"{fname} holds {found!r}, not llmkit.{kind}{hint}")
    if not isinstance(header.get("version"), int) or header["version"] > FORMAT_VERSION:
        raise ValueError(f"{fname}: format version {header.get('version')!r} is newer than this llmkit reads "
                         f"({FORMAT_VERSION}); upgrade llmkit")
    if mmap:
        tensors = _memory_map(fname, names)
    return header, tensors


def sniff(fname) -> str | None:
    """The kind ("KeyedVectors", "Word2Vec", "GloVe") of an llmkit file, or None for any other file."""
    try:
        with open(fname, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
        meta = json.loads(header["__metadata__"][_META_KEY])
        found = meta["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found[len("llmkit."):] if isinstance(found, str) and found.startswith("llmkit.") else None


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
           "BOOL": np.bool_}


def _memory_map(fname: str, names: list[str]) -> dict[str, np.ndarray]:
    """Read-only numpy maps of the tensors (safe_open validated the header just before)."""
    with open(fname, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        layout = json.loads(f.read(size))
    start = 8 + size
    out = {}
    for name in names:
        entry = layout[name]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        dtype = _DTYPES[entry["dtype"]]
        if end == begin:
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            out[name] = np.memmap(fname, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def need(tensors: dict[str, np.ndarray], name: str, fname, shape: tuple | None = None) -> np.ndarray:
    """Tensor `name`, checked for presence and (where given; -1 = any) shape."""
    t = _need(tensors, name, fname)
    if shape is not None and (t.ndim != len(shape) or any(s not in (-1, n) for s, n in zip(shape, t.shape))):
        raise ValueError(f"{fname}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} (damaged file)")
    return t
