"""Apply LoRA to a model by module names, as PEFT's ``get_peft_model`` does, without a wrapper model.

:func:`apply_lora` replaces each targeted linear layer in place by a
:class:`~llmkit.nn.LoraLinear` around it, freezes every other parameter and
returns **the same model object**, so module paths and state_dict keys are
PEFT's in-memory ones (``...q_proj.base_layer.weight``,
``...q_proj.lora_A.default.weight``) and the model keeps its class (a
transformers model stays one: ``generate``, ``save_pretrained`` of the full
model, Trainer). PEFT's ``PeftModel`` methods that code calls on the result
are put on that object as instance attributes (they shadow transformers'
methods of the same names, which drive PEFT's own layers and would fail on
these): ``disable_adapter()`` (a context manager), ``set_adapter(name)``,
``add_adapter(name, config)``, ``delete_adapter(name)``,
``print_trainable_parameters()``, ``get_nb_trainable_parameters()``, and the
attribute ``active_adapter``. Each is also a function here taking the model
first (:func:`disable_adapter`, ...), which works on any model with LoRA layers.

Named adapters, as PEFT: a model holds several (``add_adapter``), one active
at a time (``set_adapter``; multi-adapter mixing is not implemented). The
active adapter trains; the others are frozen. A layer a non-active adapter
targets but the active one does not computes its base output.

Target selection follows PEFT's ``LoraConfig.target_modules``:

* a list of names: a module matches if its full name equals a name or ends
  with ``"." + name`` (``["q_proj", "v_proj"]``);
* a string: a regular expression that must match the whole module name
  (``re.fullmatch``), e.g. ``r".*\\.(q|v)_proj"``;
* ``"all-linear"``: every ``nn.Linear``, ``Linear4bit`` and transformers
  ``Conv1D`` except the output head (``model.get_output_embeddings()``, or a
  top-level ``lm_head`` for models without that method);
* None: PEFT's default for the model's ``config.model_type`` (q/v projections
  for Llama-likes, ``c_attn`` for GPT-2, ...).

``exclude_modules`` removes matches the same way (names or a regex).
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Union

from torch import nn

from ..nn.linear4bit import Linear4bit, is_conv1d
from ..nn.lora import LoraLinear, check_adapter_name
from ..utils import get_logger
from .config import DEFAULT_TARGET_MODULES, LoraConfig, as_lora_config

logger = get_logger(__name__)

ALL_LINEAR = "all-linear"
TargetModules = Union[str, Iterable[str]]

# Old llmkit keyword names -> PEFT's, for the error that says what to write instead.
_RENAMED = {"alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora"}
# The PeftModel methods put on a model apply_lora returns (see the module docstring).
_MODEL_METHODS = ("disable_adapter", "set_adapter", "add_adapter", "delete_adapter", "print_trainable_parameters",
                  "get_nb_trainable_parameters")


@dataclass
class LoraState:
    """What a model's adapters were made from, kept on the model as ``model.llmkit_lora``:
    the config of each adapter by name (insertion order) and the active one."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: str | None = None


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


def _unwrapped_names(model: nn.Module) -> tuple[list[str], dict[str, nn.Module]]:
    """Module names as the plain model has them: a LoraLinear stands for its base layer and
    its insides are skipped (so a second adapter targets the same names as the first)."""
    names, modules, wrapped = [], {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, LoraLinear):
            wrapped.append(name + ".")
            module = module.base_layer
        names.append(name)
        modules[name] = module
    return names, modules


def _matches(name: str, spec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def default_target_modules(model: nn.Module):
    """PEFT's default ``target_modules`` for the model's ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(f"target_modules is None and PEFT has no default for {type(model).__name__} (model_type "
                     f"{model_type!r}): give target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'")


def find_target_modules(model: nn.Module, target_modules: TargetModules | None,
                        exclude_modules: TargetModules | None = None) -> list[str]:
    """Full names of the modules `target_modules` selects, less `exclude_modules`
    (PEFT's matching), in ``named_modules`` order. Raises ValueError when nothing
    matches (with the names that exist) and TypeError when a match is not a linear layer."""
    names, modules = _unwrapped_names(model)
    if target_modules is None:
        target_modules = default_target_modules(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = output_head_name(model)
        found = [n for n in names if is_linear(modules[n]) and n != head]
        if not found:
            raise ValueError(f"target_modules='all-linear' found no linear layer (other than the output head "
                             f"{head!r}) in {type(model).__name__}")
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None
        else:
            targets = list(target_modules) if not isinstance(target_modules, (bytes, int)) else []
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise TypeError("target_modules must be 'all-linear', a regex string or a non-empty list of module "
                                f"names, got {target_modules!r}")
            target_modules = targets
        found = [n for n in names if _matches(n, target_modules)]
        if not found:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if is_linear(modules[n])})
            raise ValueError(f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
                             f"its linear layers are named {leaves}")
    if exclude_modules:
        if isinstance(exclude_modules, str):
            try:
                re.compile(exclude_modules)
            except re.error as e:
                raise ValueError(f"exclude_modules {exclude_modules!r} is not a valid regular expression: {e}") \
                    from None
        found = [n for n in found if not _matches(n, exclude_modules)]
        if not found:
            raise ValueError(f"exclude_modules {exclude_modules!r} excludes every module target_modules "
                             f"{target_modules!r} selects")
    for n in found:
        if not is_linear(modules[n]):
            raise TypeError(f"target module {n!r} is a {type(modules[n]).__name__}; LoRA here supports nn.Linear, "
                            "Linear4bit and transformers' Conv1D (narrow target_modules)")
    return found


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoraLinear]:
    """The LoraLinear layers of `model` by module name (those holding `adapter_name` if given)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLinear) and (adapter_name is None or adapter_name in m.lora_A)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _config_from_call(config, fields: dict, where: str) -> LoraConfig:
    """One LoraConfig from a config argument or from keyword fields (not both)."""
    for old, new in _RENAMED.items():
        if old in fields:
            raise TypeError(f"{where}: unknown argument {old!r}; llmkit uses PEFT's names: {new}=")
    if config is not None:
        if isinstance(config, (str, list, tuple, set)):
            raise TypeError(f"{where}: the second argument is a LoraConfig (as PEFT's get_peft_model(model, "
                            f"config)); pass target modules as target_modules={config!r}")
        if fields:
            raise TypeError(f"{where}: give either a config or keyword fields ({', '.join(fields)}), not both")
        return as_lora_config(config)
    try:
        return LoraConfig(**fields)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"{where}: {exc.args[0].split(') ', 1)[-1]}; the fields are PEFT's LoraConfig's") \
                from None
        raise


def _resolved_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    return find_target_modules(model, config.target_modules, config.exclude_modules)


def _add(model: nn.Module, config: LoraConfig, adapter_name: str, active: str) -> list[str]:
    """Put adapter `adapter_name` on the targeted layers (wrapping the ones not wrapped yet),
    frozen; newly wrapped layers get `active` as their active adapter, as the others have.
    Every check runs before the first change, so an error leaves the model as it was."""
    names = _resolved_targets(model, config)
    layers = lora_layers(model)
    for name in names:
        if name in layers and adapter_name in layers[name].lora_A:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}")
    # New wrappers first, the model untouched: one that cannot be built (a bitsandbytes layer) raises here.
    wrappers = {}
    flags = {name: model.get_submodule(name).weight.requires_grad for name in names if name not in layers}
    try:
        for name in flags:
            wrappers[name] = LoraLinear(model.get_submodule(name), adapter_name, r=config.r,
                                        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                        use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
            wrappers[name].set_adapter(active)  # freezes the new adapter unless it is `active`
    except BaseException:
        for name, flag in flags.items():  # LoraLinear froze the base weights it wrapped: undo
            weight = model.get_submodule(name).weight
            if weight.is_floating_point():
                weight.requires_grad_(flag)
        raise
    for name in names:
        if name in layers:
            layers[name].update_layer(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                                      config.use_rslora, config.init_lora_weights)
        else:
            replace_module(model, name, wrappers[name])
    return names


def _stored_config(model: nn.Module, config: LoraConfig, names: list[str]) -> LoraConfig:
    """The config as saved: "all-linear" expanded to the module names (as PEFT saves it), None
    resolved to PEFT's default for the model type; fan_in_fan_out set from the layers."""
    target = config.target_modules
    if target is None:
        target = default_target_modules(model)
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        target = list(names)
    layers = lora_layers(model)
    fan_in_fan_out = any(layers[n].fan_in_fan_out for n in names)
    if config.fan_in_fan_out and not fan_in_fan_out:
        logger.warning("fan_in_fan_out=True but the target layers are not Conv1D; it is set from the layer type")
    return replace(config, target_modules=list(target) if not isinstance(target, str) else target,
                   fan_in_fan_out=fan_in_fan_out)


def _state(model: nn.Module) -> LoraState | None:
    state = getattr(model, "llmkit_lora", None)
    return state if isinstance(state, LoraState) else None


def _attach_methods(model: nn.Module) -> None:
    # functools.partial, not a bound method: it pickles (torch.save(model)) and deep-copies with the model.
    for name in _MODEL_METHODS:
        function = globals()[name]
        model.__dict__[name] = functools.update_wrapper(functools.partial(function, model), function)


def _detach_methods(model: nn.Module) -> None:
    for name in _MODEL_METHODS + ("active_adapter",):
        model.__dict__.pop(name, None)


def apply_lora(model: nn.Module, config: LoraConfig | Any = None, adapter_name: str = "default",
               **fields: Any) -> nn.Module:
    """Wrap the target modules of `model` in LoRA adapters (in place), freeze
    everything else and make the adapter active; returns `model` (PEFT's
    ``get_peft_model(model, config, adapter_name)``, without the wrapper).

    Either a config -- :class:`~llmkit.adapt.LoraConfig`, a ``peft.LoraConfig``
    or an ``adapter_config.json`` dict -- or its fields as keywords, with PEFT's
    names and defaults::

        apply_lora(model, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=8, lora_dropout=0.0,
                   use_rslora=False)
        apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))

    ``target_modules=None`` (the default) is PEFT's per-architecture default.
    ``inference_mode=True`` leaves the adapter frozen.

    Raises ValueError for r < 1, lora_alpha <= 0, lora_dropout outside [0, 1),
    targets that match nothing, and a model that already has LoRA layers (use
    :func:`add_adapter` for a second adapter); TypeError for unknown keyword
    fields (old llmkit names included: ``alpha`` is ``lora_alpha``);
    NotImplementedError for PEFT features llmkit does not implement.
    """
    config = _config_from_call(config, fields, "apply_lora")
    check_adapter_name(adapter_name)
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers ({next(iter(lora_layers(model)))}, ...); "
                         "add another adapter with add_adapter(model, name, config), merge_lora(model) first, or "
                         "load weights into the existing adapter with load_adapter")
    names = _add(model, config, adapter_name, active=adapter_name)
    for p in model.parameters():  # PEFT's bias="none": only the adapters train
        p.requires_grad_(False)
    model.llmkit_lora = LoraState({adapter_name: _stored_config(model, config, names)}, None)
    _attach_methods(model)
    set_adapter(model, adapter_name, inference_mode=config.inference_mode)
    return model


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default"):
    """PEFT's entry point: LoRA configs go to :func:`apply_lora` (returns `model`
    itself, adapted in place), prompt-tuning configs to
    :func:`~llmkit.adapt.apply_prompt_tuning` (returns a PromptTunedModel)."""
    if isinstance(peft_config, dict):
        peft_type = peft_config.get("peft_type", "LORA")
    else:
        peft_type = getattr(peft_config, "peft_type", None) or "LORA"
    peft_type = str(getattr(peft_type, "value", peft_type))
    if peft_type == "PROMPT_TUNING":
        from .prompt_tuning import apply_prompt_tuning

        if adapter_name != "default":
            raise NotImplementedError("named prompt-tuning adapters are not implemented; leave adapter_name='default'")
        return apply_prompt_tuning(model, config=peft_config)
    if peft_type != "LORA":
        raise NotImplementedError(f"peft_type {peft_type!r} is not implemented in llmkit (LORA and PROMPT_TUNING are)")
    return apply_lora(model, peft_config, adapter_name=adapter_name)


def _require_state(model: nn.Module, what: str) -> LoraState:
    state = _state(model)
    if state is None or not lora_layers(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters ({what} needs apply_lora first)")
    return state


def add_adapter(model: nn.Module, adapter_name: str, peft_config: LoraConfig | Any = None, **fields: Any) -> None:
    """Add a second (third, ...) adapter to a model with LoRA (PEFT's
    ``PeftModel.add_adapter(adapter_name, peft_config)``). It may target other
    modules than the first. It is not made active: :func:`set_adapter`."""
    config = _config_from_call(peft_config, fields, "add_adapter")
    check_adapter_name(adapter_name)
    state = _require_state(model, "add_adapter")
    if adapter_name in state.configs:
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r} "
                         f"(adapters: {list(state.configs)})")
    names = _add(model, config, adapter_name, active=state.active)  # frozen until set_adapter
    state.configs[adapter_name] = _stored_config(model, config, names)


def set_adapter(model: nn.Module, adapter_name: str, inference_mode: bool = False) -> None:
    """Make `adapter_name` the active adapter (PEFT's ``set_adapter``): it computes
    and trains (frozen with `inference_mode`); the other adapters are frozen."""
    state = _require_state(model, "set_adapter")
    if adapter_name not in state.configs:
        raise ValueError(f"{type(model).__name__} has no adapter {adapter_name!r} (adapters: {list(state.configs)})")
    layers = lora_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged and layer.merged_adapters[0] != adapter_name]
    if merged:
        raise ValueError(f"{merged[0]} has adapter {layers[merged[0]].merged_adapters[0]!r} merged into its weight; "
                         "unmerge it before switching adapters")
    for layer in layers.values():
        layer.set_adapter(adapter_name, inference_mode=inference_mode)
    state.active = adapter_name
    model.__dict__["active_adapter"] = adapter_name  # PEFT's attribute (a property there)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter of `model`."""
    return _require_state(model, "active_adapter").active


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` (PEFT's ``delete_adapter``). If it was active,
    the first remaining adapter becomes active. Layers left without any adapter
    are unwrapped (their base layer goes back in place); deleting the last
    adapter leaves the plain model (frozen, as PEFT leaves it)."""
    state = _require_state(model, "delete_adapter")
    if adapter_name not in state.configs:
        raise ValueError(f"{type(model).__name__} has no adapter {adapter_name!r} (adapters: {list(state.configs)})")
    layers = lora_layers(model, adapter_name)
    merged = [n for n, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[0]}; unmerge it before deleting")
    for name, layer in layers.items():
        layer.delete_adapter(adapter_name)
        if not layer.lora_A:
            replace_module(model, name, layer.base_layer)
    del state.configs[adapter_name]
    if not state.configs:
        del model.llmkit_lora
        _detach_methods(model)
        return
    if state.active == adapter_name:
        first = next(iter(state.configs))
        set_adapter(model, first, inference_mode=state.configs[first].inference_mode)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Within the ``with`` block `model` computes its base output: no adapter
    contributes and no gradient reaches the adapters (PEFT's
    ``with model.disable_adapter():``, DPO's reference model). The previous
    state is restored on exit, on exceptions too. A model with a merged
    adapter is refused (its delta is inside the base weights): unmerge first.
    A :class:`~llmkit.adapt.PromptTunedModel` has this as a method."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to disable")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"{merged[0]} has adapter {layers[merged[0]].merged_adapters[0]!r} merged into its base "
                         "weight, so the base output cannot be computed; unmerge() the layers first "
                         "(merge_lora's result has no adapter to disable)")
    before = {name: layer.disable_adapters for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.enable_adapters(False)
        yield
    finally:
        for name, layer in layers.items():
            layer.enable_adapters(not before[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the active adapter into the base weights and put the base layers back in
    their places, dropping every adapter (PEFT's ``merge_and_unload``); returns
    `model`. Merging into a Linear4bit requantizes (and warns about rounding)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge")
    disabled = [n for n, layer in layers.items() if layer.disable_adapters]
    if disabled:
        raise ValueError(f"the adapters of {disabled[0]} are disabled (inside disable_adapter()?); merge outside it")
    for name, layer in layers.items():
        if not layer.merged and layer.active_adapter in layer.lora_A:
            layer.merge()
        replace_module(model, name, layer.base_layer)
    model.__dict__.pop("llmkit_lora", None)
    _detach_methods(model)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base layers go back in place
    (PEFT's ``unload``); a merged layer is unmerged first. Returns `model`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to unload")
    for name, layer in layers.items():
        if layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    model.__dict__.pop("llmkit_lora", None)
    _detach_methods(model)
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


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's ``print_trainable_parameters``."""
    print(trainable_parameters(model))


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """PEFT's ``get_nb_trainable_parameters``: (trainable, all)."""
    report = trainable_parameters(model)
    return report.trainable, report.total


__all__ = ["apply_lora", "get_peft_model", "add_adapter", "set_adapter", "active_adapter", "delete_adapter",
           "disable_adapter", "merge_lora", "unload_lora", "trainable_parameters", "print_trainable_parameters",
           "get_nb_trainable_parameters", "find_target_modules", "default_target_modules", "lora_layers",
           "LoraState", "ParameterReport"]
