"""The state that travels with NF4-packed weights, in bitsandbytes' terms.

`NF4State` carries the fields of bitsandbytes' ``QuantState`` under the same
names (absmax, shape, dtype, blocksize, offset, state2, code, quant_type), and
converts to and from a ``QuantState`` object and its serialized dict (the
``quant_state.bitsandbytes__nf4`` packed form that Linear4bit state_dicts and
safetensors files hold). So weights quantized by bitsandbytes load here, and
ours load there, byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

# NF4 values (QLoRA, bitsandbytes' table), in code order.
NF4_CODES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_PACKED_KEY = "quant_state.bitsandbytes__nf4"


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as a float32 tensor (``QuantState.code``)."""
    return torch.tensor(NF4_CODES, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit "dynamic" code of Dettmers (arXiv:1511.04561) that bitsandbytes
    uses for double quantization: for exponent e = 0..6, the midpoints of
    linspace(0.1, 1, 2**(e) + 1) scaled by 10**(e - 6), both signs, plus 0 and
    1; sorted, 256 float32 values. Built with float32 torch ops so the values
    are bit-identical to bitsandbytes' ``create_dynamic_map()``."""
    values: list[float] = []
    non_sign_bits = total_bits - 1
    for e in range(max_exponent_bits):
        if signed:
            items = 2 ** (e + non_sign_bits - max_exponent_bits) + 1
        else:
            items = 2 ** (e + non_sign_bits - max_exponent_bits + 1) + 1
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + e)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # 0 for the default 8-bit map
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAP: dict[torch.device, torch.Tensor] = {}


def cached_dynamic_map(device: torch.device) -> torch.Tensor:
    device = torch.device(device)
    if device not in _DYNAMIC_MAP:
        _DYNAMIC_MAP[device] = dynamic_map().to(device)
    return _DYNAMIC_MAP[device]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in quant state")
    return dtype


@dataclass
class NestedState:
    """The 8-bit blockwise state of double-quantized absmax (``QuantState.state2``)."""

    absmax: torch.Tensor  # float32, one per block of `blocksize` absmax codes
    code: torch.Tensor  # float32 (256,), the dynamic map
    blocksize: int = 256
    dtype: torch.dtype = torch.float32


@dataclass
class NF4State:
    """Everything needed to dequantize an NF4-packed tensor.

    absmax: float32 per block, or with double quant (``state2`` set) uint8
    codes of ``absmax - offset``; shape/dtype: the original tensor's.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    offset: Optional[torch.Tensor] = None  # float32 0-d tensor (double quant)
    state2: Optional[NestedState] = None
    code: Optional[torch.Tensor] = None
    quant_type: str = "nf4"

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = nf4_code(self.absmax.device)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device: torch.device | str) -> "NF4State":
        """A copy of the state on `device` (bitsandbytes' ``to`` mutates; ours returns)."""
        state2 = None
        if self.state2 is not None:
            state2 = replace(self.state2, absmax=self.state2.absmax.to(device), code=self.state2.code.to(device))
        return replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            state2=state2,
        )

    def nbytes(self) -> int:
        """Bytes the state occupies (absmax, nested absmax, offset; not the shared code tables)."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.state2 is not None:
            total += self.state2.absmax.numel() * 4 + 4
        return total

    # ---------------------------------------------------------- bitsandbytes --

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The dict bitsandbytes' ``QuantState.as_dict`` gives: with
        ``packed=True`` only tensors, non-tensor items JSON-encoded in a uint8
        tensor under ``quant_state.bitsandbytes__nf4`` (what state_dicts hold)."""
        items: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.state2 is not None:
            items.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed:
            return items
        tensors = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
        tensors[_PACKED_KEY] = torch.tensor(list(json.dumps(others).encode("utf-8")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> "NF4State":
        """Inverse of :meth:`as_dict`; accepts packed or unpacked dicts, with or
        without module prefixes on the keys (``weight.absmax`` ...)."""
        items = {k.split(".")[-1] if not k.endswith("bitsandbytes__nf4") else _PACKED_KEY: v
                 for k, v in qs_dict.items()}
        packed_keys = [k for k in items if k.endswith("bitsandbytes__fp4")]
        if packed_keys:
            raise ValueError("this quant state is FP4; llmkit reads NF4 states only")
        if _PACKED_KEY in items:
            blob = items.pop(_PACKED_KEY)
            items.update(json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8")))
        missing = {"quant_type", "absmax", "blocksize", "dtype", "shape"} - items.keys()
        if missing:
            raise ValueError(f"quant state dict lacks {sorted(missing)} (keys given: {sorted(qs_dict)})")
        if items["quant_type"] != "nf4":
            raise ValueError(f"quant_type {items['quant_type']!r} is not supported; llmkit reads NF4 states")
        state2, offset = None, None
        if "nested_absmax" in items:
            offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device)
            state2 = NestedState(
                absmax=items["nested_absmax"].to(device),
                code=items["nested_quant_map"].to(device),
                blocksize=int(items["nested_blocksize"]),
                dtype=_dtype_from_name(items["nested_dtype"]),
            )
        quant_map = items.get("quant_map")
        return cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(items["shape"]),
            dtype=_dtype_from_name(items["dtype"]),
            blocksize=int(items["blocksize"]),
            offset=offset,
            state2=state2,
            code=None if quant_map is None else quant_map.to(device),
        )

    def to_bnb(self):
        """A ``bitsandbytes.functional.QuantState`` holding the same tensors."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.state2 is not None:
            state2 = QuantState(
                absmax=self.state2.absmax,
                code=self.state2.code,
                blocksize=self.state2.blocksize,
                dtype=self.state2.dtype,
            )
        return QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )

    @classmethod
    def from_bnb(cls, quant_state) -> "NF4State":
        """From a ``bitsandbytes.functional.QuantState`` (NF4 only)."""
        if getattr(quant_state, "quant_type", None) != "nf4":
            raise ValueError(f"quant_type {getattr(quant_state, 'quant_type', None)!r} is not supported; "
                             "llmkit reads NF4 states")
        state2 = None
        if quant_state.state2 is not None:
            s2 = quant_state.state2
            state2 = NestedState(absmax=s2.absmax, code=s2.code, blocksize=int(s2.blocksize),
                                 dtype=s2.dtype or torch.float32)
        return cls(
            absmax=quant_state.absmax,
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=int(quant_state.blocksize),
            offset=quant_state.offset,
            state2=state2,
            code=quant_state.code,
        )
