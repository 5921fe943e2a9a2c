"""LoRA (Hu et al. 2021) over a frozen linear layer, in PEFT's conventions.

``y = base_layer(x) + scaling * dropout(x) @ lora_A.T @ lora_B.T`` with
``lora_A`` (r, in_features), ``lora_B`` (out_features, r), ``scaling =
lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``), A initialised with
``kaiming_uniform_(a=sqrt(5))`` and B with zeros, so a fresh layer computes
exactly its base layer. The whole expression is one fused op
(:func:`llmkit.ops.lora_linear`) whose backward saves only x and regenerates
the dropout mask from a seed.

Names: the wrapped layer is ``base_layer`` (PEFT's name, so base weights keep
their ``<path>.base_layer.weight`` key) and the adapter is two parameters,
``<path>.lora_A`` and ``<path>.lora_B``. PEFT holds them as ``<path>.lora_A.
default.weight`` in memory and as ``base_model.model.<path>.lora_A.weight`` in
adapter files; :mod:`llmkit.adapt.peft_format` maps between the two.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import ops
from .linear4bit import Linear4bit, dense_weight, is_conv1d


class LoraLinear(nn.Module):
    """A LoRA adapter around an ``nn.Linear``, a :class:`Linear4bit` (QLoRA) or
    transformers' ``Conv1D`` (GPT-2; PEFT's ``fan_in_fan_out``).

    Args:
        base_layer: the layer to adapt. Its weight is frozen here
            (``requires_grad=False``): the fused op computes no gradient for
            it. Its bias keeps its flag (``apply_lora`` freezes it, as PEFT's
            ``bias="none"``).
        r: rank (>= 1).
        lora_alpha: scaling numerator (> 0).
        lora_dropout: dropout probability on the adapter's input, in [0, 1).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        init_lora_weights: PEFT's init (True: B zeros, a no-op adapter) or,
            as PEFT's ``init_lora_weights=False``, both A and B random like an
            ``nn.Linear`` weight (an adapter that changes the output).

    The adapter parameters are float32 (float64 over a float64 base), as PEFT
    upcasts half-precision adapters (``autocast_adapter_dtype``); the op casts
    them to the compute dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool = True):
        super().__init__()
        if not (isinstance(base_layer, (nn.Linear, Linear4bit)) or is_conv1d(base_layer)):
            raise TypeError(f"LoraLinear wraps nn.Linear, llmkit.nn.Linear4bit or transformers' Conv1D, "
                            f"got {type(base_layer).__name__}")
        check_lora_args(r, lora_alpha, lora_dropout)
        if isinstance(base_layer, Linear4bit):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            dtype, device = torch.float32, base_layer.weight.device
        else:
            self.out_features, self.in_features = dense_weight(base_layer).shape
            weight = base_layer.weight
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            device = weight.device
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, dtype=dtype, device=device))
        self.merged = False
        if init_lora_weights:
            self.reset_lora_parameters()
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init: A like ``nn.Linear``'s weight (kaiming uniform, a=sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # Like PEFT's tuner layers, expose the base layer's weight and bias, for
    # code that reads ``module.weight`` (tied embeddings, dtype probes).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if isinstance(base, Linear4bit):
            # As Linear4bit.forward: compute in its dtype, return in x's.
            dtype = base.dtype
            bias = None if base.bias is None else base.bias.to(dtype)
            y = ops.lora_linear(x.to(dtype), (base.weight, base.quant_state), bias, self.lora_A, self.lora_B,
                            self.scaling, self.lora_dropout, training=self.training)
            return y.to(x.dtype)
        weight, bias = dense_weight(base), base.bias
        if torch.is_autocast_enabled(x.device.type):
            # The fused op has no autocast rule: cast as autocast would for F.linear.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return ops.lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
                           training=self.training)

    # ------------------------------------------------------------- merging --

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, (out_features, in_features), in float32 at least
        (PEFT computes CPU half-precision deltas in float32 too)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``W += scaling * B @ A``.

        Dense weights are updated in place in their dtype (one rounding, as
        PEFT). Over NF4 the weight is dequantized, updated and requantized,
        which rounds it again: a warning says so, as PEFT's does.
        """
        if self.merged:
            warnings.warn("LoraLinear is already merged; nothing to do.")
            return
        self._add_to_base(self.delta_weight(), "Merge")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= scaling * B @ A`` (NF4: requantized again)."""
        if not self.merged:
            warnings.warn("LoraLinear is not merged; nothing to do.")
            return
        self._add_to_base(-self.delta_weight(), "Unmerge")
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor, what: str) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            warnings.warn(f"{what} lora module to 4-bit linear may get different generations due to rounding errors.")
            base.requantize_(base.dequantize(delta.dtype) + delta)
        else:
            base.weight.add_(delta.T if self.fan_in_fan_out else delta)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}")


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
