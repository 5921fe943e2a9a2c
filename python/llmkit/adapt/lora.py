"""Apply LoRA to a model by module names, as PEFT's ``get_peft_model`` does.

Without a wrapper model: :func:`apply_lora` replaces each targeted linear
layer in place by a :class:`~llmkit.nn.LoraLinear` around it, freezes every
other parameter and returns the same model object, so module paths are
unchanged (``model.layers.0.self_attn.q_proj.base_layer.weight``, and the
adapter at ``...q_proj.lora_A`` / ``...q_proj.lora_B``).

Target selection follows PEFT's ``LoraConfig.target_modules``:

* a list of names: a module matches if its full name equals a name or ends
  with ``"." + name`` (``["q_proj", "v_proj"]``);
* a string: a regular expression that must match the whole module name
  (``re.fullmatch``), e.g. ``r".*\\.(q|v)_proj"``;
* ``"all-linear"``: every ``nn.Linear``, ``Linear4bit`` and transformers
  ``Conv1D`` except the output head (``model.get_output_embeddings()``, or a
  top-level ``lm_head`` for models without that method).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Union

from torch import nn

from ..nn.linear4bit import Linear4bit, is_conv1d
from ..nn.lora import LoraLinear, check_lora_args

ALL_LINEAR = "all-linear"
TargetModules = Union[str, Iterable[str]]


@dataclass
class LoraSettings:
    """What :func:`apply_lora` was asked for (kept on the model as
    ``model.llmkit_lora`` so :func:`~llmkit.adapt.peft_format.save_adapter`
    can write PEFT's config). ``target_modules`` is the user's list or regex;
    ``"all-linear"`` is stored expanded to module names, as PEFT saves it."""

    target_modules: Union[str, list[str]]
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool


def is_linear(module: nn.Module) -> bool:
    """Layers LoRA can wrap: nn.Linear, llmkit's Linear4bit, transformers' Conv1D."""
    return isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module)


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the output head that ``"all-linear"`` leaves out
    (PEFT excludes ``get_output_embeddings()`` of transformers models)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def find_target_modules(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Full names of the modules `target_modules` selects (PEFT's matching),
    in ``named_modules`` order. Raises ValueError when nothing matches (with
    the names that exist) and TypeError when a match is not a linear layer."""
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = output_head_name(model)
        found = [n for n in names if is_linear(modules[n]) and n != head]
        if not found:
            raise ValueError(f"target_modules='all-linear' found no linear layer (other than the output head "
                             f"{head!r}) in {type(model).__name__}")
        return found
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        targets = list(target_modules) if target_modules is not None else []
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise TypeError("target_modules must be 'all-linear', a regex string or a non-empty list of module "
                            f"names, got {target_modules!r}")
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if is_linear(modules[n])})
        raise ValueError(f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers are named {leaves}")
    for n in found:
        if not is_linear(modules[n]):
            raise TypeError(f"target module {n!r} is a {type(modules[n]).__name__}; LoRA here supports nn.Linear, "
                            "Linear4bit and transformers' Conv1D (narrow target_modules)")
    return found


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoraLinear layers of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, target_modules: TargetModules = ALL_LINEAR, r: int = 8, alpha: float = 8,
               dropout: float = 0.0, rslora: bool = False) -> nn.Module:
    """Wrap the `target_modules` of `model` in LoRA adapters (in place) and
    freeze everything else; returns `model`.

    Args:
        target_modules: names (suffix match), a regex (full match) or
            ``"all-linear"`` (see the module docstring). Default all-linear.
        r: rank; alpha: ``lora_alpha`` (scaling alpha / r); dropout: on the
            adapter input; rslora: scale by alpha / sqrt(r).

    Raises ValueError for r < 1, alpha <= 0, dropout outside [0, 1), targets
    that match nothing, and a model that already has LoRA layers.
    """
    check_lora_args(r, alpha, dropout)
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers ({next(iter(lora_layers(model)))}, ...); "
                         "merge_lora(model) first, or load into the existing adapters with load_adapter")
    names = find_target_modules(model, target_modules)
    for name in names:
        replace_module(model, name, LoraLinear(model.get_submodule(name), r=r, lora_alpha=alpha,
                                               lora_dropout=dropout, use_rslora=rslora))
    mark_only_lora_trainable(model)
    if isinstance(target_modules, str):
        spec = names if target_modules.lower() == ALL_LINEAR else target_modules
    else:
        spec = list(target_modules)
    model.llmkit_lora = LoraSettings(spec, r, alpha, float(dropout), bool(rslora))
    return model


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad False everywhere but lora_A / lora_B (PEFT's bias="none")."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the base layer back in
    its place (PEFT's ``merge_and_unload``); returns `model`. Merging into a
    Linear4bit requantizes (and warns about rounding)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        replace_module(model, name, layer.base_layer)
    if hasattr(model, "llmkit_lora"):
        del model.llmkit_lora
    return model


@dataclass
class ParameterReport:
    """Trainable and total parameter counts. A Linear4bit weight counts its
    unpacked elements (two per byte), as PEFT counts a ``Params4bit``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # PEFT's print_trainable_parameters line
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module, verbose: bool = False) -> ParameterReport:
    """Count trainable and all parameters (shared ones once); with `verbose`,
    print PEFT's ``trainable params: ... || all params: ... || trainable%: ...``."""
    packed = {id(m.weight): m.quant_state.numel for m in model.modules() if isinstance(m, Linear4bit)}
    trainable = total = 0
    for p in model.parameters():  # deduplicates tied parameters
        n = packed.get(id(p), p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    report = ParameterReport(trainable, total)
    if verbose:
        print(report)
    return report


__all__ = ["apply_lora", "merge_lora", "trainable_parameters", "find_target_modules", "lora_layers",
           "LoraSettings", "ParameterReport"]
