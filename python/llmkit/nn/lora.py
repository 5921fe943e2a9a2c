"""LoRA (Hu et al. 2021) over a frozen linear layer, in PEFT's conventions and memory layout.

``y = base_layer(x) + scaling * dropout(x) @ A.T @ B.T`` with A (r,
in_features), B (out_features, r), ``scaling = lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``), A initialised with ``kaiming_uniform_(a=sqrt(5))``
and B with zeros, so a fresh adapter computes exactly its base layer. The
whole expression is one fused op (:func:`llmkit.ops.lora_linear`) whose
backward saves only x and regenerates the dropout mask from a seed.

Layout: PEFT's ``lora.Linear``, attribute for attribute, so module paths and
``state_dict`` keys are PEFT's in-memory ones and code that pokes at PEFT's
layers works here:

* ``base_layer``: the wrapped layer (``<path>.base_layer.weight``);
* ``lora_A[name]`` / ``lora_B[name]``: ``nn.Linear(in, r)`` / ``nn.Linear(r,
  out)`` without bias in ``nn.ModuleDict`` s keyed by adapter name
  (``<path>.lora_A.default.weight``);
* ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout`` (the probability),
  ``use_rslora``: dicts keyed by adapter name.

A layer holds any number of named adapters; one is active at a time
(``set_adapter``), or none (``enable_adapters(False)``: the base layer alone).
Adapter files drop the adapter name (``base_model.model.<path>.lora_A.weight``);
:mod:`llmkit.adapt.peft_format` maps between the two.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import nn

from .. import ops
from .linear4bit import Linear4bit, dense_weight, is_conv1d

__all__ = ["LoraLinear", "check_lora_args", "check_adapter_name", "check_init_lora_weights"]

# Adapter names become ModuleDict keys and, when saved, sub-directory names: keep them plain.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_NOT_ADAPTER_NAMES = {"training"} | set(dir(nn.ModuleDict))


class LoraLinear(nn.Module):
    """LoRA adapters around an ``nn.Linear``, a :class:`Linear4bit` (QLoRA) or
    transformers' ``Conv1D`` (GPT-2; PEFT's ``fan_in_fan_out``).

    Args:
        base_layer: the layer to adapt. Its weight is frozen here
            (``requires_grad=False``): the fused op computes no gradient for
            it. Its bias keeps its flag (``apply_lora`` freezes it, as PEFT's
            ``bias="none"``).
        adapter_name: name of the first adapter (PEFT's ``"default"``); it is active.
        r: rank (>= 1).
        lora_alpha: scaling numerator (> 0).
        lora_dropout: dropout probability on the adapter's input, in [0, 1).
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        init_lora_weights: PEFT's init: ``True`` (A kaiming-uniform, B zeros:
            a no-op adapter), ``"gaussian"`` (A ~ N(0, 1/r), B zeros) or
            ``False`` (A and B both initialised like an ``nn.Linear`` weight:
            an adapter that changes the output).

    The adapter weights are float32 (float64 over a float64 base), as PEFT
    upcasts half-precision adapters (``autocast_adapter_dtype``); the op casts
    them to the compute dtype.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: bool | str = True):
        super().__init__()
        if not (isinstance(base_layer, (nn.Linear, Linear4bit)) or is_conv1d(base_layer)):
            raise TypeError(f"LoraLinear wraps nn.Linear, llmkit.nn.Linear4bit or transformers' Conv1D, "
                            f"got {type(base_layer).__name__}")
        if isinstance(base_layer, Linear4bit):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.out_features, self.in_features = dense_weight(base_layer).shape  # raises for bitsandbytes layers
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter: str | None = None
        self._disable_adapters = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------ adapters --

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        weight = self.base_layer.weight
        if isinstance(self.base_layer, Linear4bit):
            return torch.float32, weight.device
        return (torch.float64 if weight.dtype == torch.float64 else torch.float32), weight.device

    def update_layer(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: bool | str = True) -> None:
        """Add the adapter `adapter_name` (PEFT's ``update_layer``); it is not made active.
        Raises ValueError if the name is taken (``delete_adapter`` it first)."""
        check_adapter_name(adapter_name)
        check_lora_args(r, lora_alpha, lora_dropout)
        init_lora_weights = check_init_lora_weights(init_lora_weights)
        if adapter_name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {adapter_name!r}; delete_adapter it first "
                             "or pick another name")
        dtype, device = self._adapter_dtype_device()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        self.r[adapter_name] = int(r)
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        # A new adapter does not train until it is made active (PEFT's add_adapter).
        self.lora_A[adapter_name].weight.requires_grad_(False)
        self.lora_B[adapter_name].weight.requires_grad_(False)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True) -> None:
        """PEFT's init of `adapter_name`: True: A like ``nn.Linear``'s weight (kaiming
        uniform, a=sqrt(5)), B zeros; "gaussian": A ~ N(0, 1/r), B zeros; False: both
        like an ``nn.Linear`` weight (B nonzero)."""
        init_lora_weights = check_init_lora_weights(init_lora_weights)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    @property
    def active_adapter(self) -> str | None:
        """The adapter the forward uses (None: none; the base layer alone)."""
        return self._active_adapter

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are switched off (PEFT's flag)."""
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off (PEFT's ``enable_adapters``). Off, the layer
        computes its base layer alone; refused while an adapter is merged, whose
        delta is inside the base weight."""
        if not enabled and self.merged:
            raise ValueError(f"adapter {self.merged_adapters[0]!r} is merged into the base weight: the layer "
                             "cannot compute its base output; unmerge() first")
        self._disable_adapters = not enabled

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter and the only trainable one (frozen too
        with `inference_mode`), as PEFT's ``set_adapter``. A name this layer does not
        have leaves it computing its base layer (the adapter targets other layers)."""
        if self.merged and adapter_name != self.merged_adapters[0]:
            raise ValueError(f"adapter {self.merged_adapters[0]!r} is merged into the base weight; unmerge() "
                             f"before switching to {adapter_name!r}")
        for name in self.lora_A:
            trainable = name == adapter_name and not inference_mode
            self.lora_A[name].weight.requires_grad_(trainable)
            self.lora_B[name].weight.requires_grad_(trainable)
        self._active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name` from this layer. If it was active, no adapter is
        active afterwards (the caller picks the next one, as PEFT's model does)."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"this layer has no adapter {adapter_name!r} (it has {list(self.lora_A)})")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before deleting it")
        for store in (self.lora_A, self.lora_B, self.r, self.lora_alpha, self.scaling, self.lora_dropout,
                      self.use_rslora):
            del store[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = None

    # Like PEFT's tuner layers, expose the base layer's weight and bias, for
    # code that reads ``module.weight`` (tied embeddings, dtype probes).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -------------------------------------------------------------- forward --

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._active_adapter
        if self.merged or self._disable_adapters or name not in self.lora_A:
            return self.base_layer(x)  # merged: the adapter is inside the base weight
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        scaling, p = self.scaling[name], self.lora_dropout[name]
        base = self.base_layer
        if isinstance(base, Linear4bit):
            # As Linear4bit.forward: compute in its dtype, return in x's.
            dtype = base.dtype
            bias = None if base.bias is None else base.bias.to(dtype)
            y = ops.lora_linear(x.to(dtype), (base.weight, base.quant_state), bias, A, B, scaling, p,
                                training=self.training)
            return y.to(x.dtype)
        weight, bias = dense_weight(base), base.bias
        if torch.is_autocast_enabled(x.device.type):
            # The fused op has no autocast rule: cast as autocast would for F.linear.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return ops.lora_linear(x, weight, bias, A, B, scaling, p, training=self.training)

    # ------------------------------------------------------------- merging --

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``scaling * B @ A`` of `adapter_name` (default: the active one),
        (out_features, in_features), in float32 at least (PEFT computes CPU
        half-precision deltas in float32 too)."""
        name = self._active_adapter if adapter_name is None else adapter_name
        if name not in self.lora_A:
            raise ValueError(f"this layer has no adapter {name!r} (it has {list(self.lora_A)})")
        A, B = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * self.scaling[name]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight: ``W += scaling * B @ A``.

        Dense weights are updated in place in their dtype (one rounding, as
        PEFT). Over NF4 the weight is dequantized, updated and requantized,
        which rounds it again: a warning says so, as PEFT's does. Refused while
        the adapters are disabled (the forward would then add a delta it was
        told to leave out).
        """
        if self.merged:
            warnings.warn("LoraLinear is already merged; nothing to do.")
            return
        if self._disable_adapters:
            raise ValueError("the adapters of this layer are disabled; enable_adapters(True) before merging")
        name = self._active_adapter
        if name not in self.lora_A:
            raise ValueError(f"no active adapter to merge (active: {name!r}, adapters: {list(self.lora_A)})")
        self._add_to_base(self.get_delta_weight(name), "Merge")
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= scaling * B @ A`` (NF4: requantized again)."""
        if not self.merged:
            warnings.warn("LoraLinear is not merged; nothing to do.")
            return
        name = self.merged_adapters[0]
        self._add_to_base(-self.get_delta_weight(name), "Unmerge")
        self.merged_adapters.clear()

    def _add_to_base(self, delta: torch.Tensor, what: str) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            warnings.warn(f"{what} lora module to 4-bit linear may get different generations due to rounding errors.")
            base.requantize_(base.dequantize(delta.dtype) + delta)
        else:
            base.weight.add_(delta.T if self.fan_in_fan_out else delta)

    def extra_repr(self) -> str:
        name = self._active_adapter
        if name not in self.lora_A:
            return f"adapters={list(self.lora_A)}, active_adapter={name!r}"
        return (f"adapters={list(self.lora_A)}, active_adapter={name!r}, r={self.r[name]}, "
                f"lora_alpha={self.lora_alpha[name]}, scaling={self.scaling[name]:g}, "
                f"lora_dropout={self.lora_dropout[name]}, use_rslora={self.use_rslora[name]}, merged={self.merged}, "
                f"disable_adapters={self._disable_adapters}")


def check_lora_args(r, lora_alpha, lora_dropout) -> None:
    """Raise ValueError/TypeError for a rank, alpha or dropout LoRA cannot use."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"r must be a positive integer, got {r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise TypeError(f"lora_alpha must be a number, got {type(lora_alpha).__name__}")
    if not lora_alpha > 0 or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a positive finite number, got {lora_alpha}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)):
        raise TypeError(f"lora_dropout must be a number, got {type(lora_dropout).__name__}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")


def check_adapter_name(adapter_name) -> str:
    """An adapter name is a ModuleDict key and a sub-directory name when saved:
    letters, digits, '_' and '-' (not starting with '-')."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    if not _ADAPTER_NAME.fullmatch(adapter_name) or adapter_name in _NOT_ADAPTER_NAMES:
        raise ValueError(f"adapter_name {adapter_name!r} is not usable: use letters, digits, '_' and '-' "
                         "(it becomes a module key and, when saved, a directory name)")
    return adapter_name


def check_init_lora_weights(init_lora_weights) -> bool | str:
    """True, False or "gaussian" (PEFT's spellings); PEFT's data-driven inits are not implemented."""
    if init_lora_weights is True or init_lora_weights is False:
        return init_lora_weights
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
        return "gaussian"
    if isinstance(init_lora_weights, str):
        raise NotImplementedError(f"init_lora_weights={init_lora_weights!r} is not implemented in llmkit; "
                                  "supported: True (PEFT's default), False, 'gaussian'")
    raise TypeError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
