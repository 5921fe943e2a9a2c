"""PEFT's config classes, field for field: ``LoraConfig`` and ``PromptTuningConfig``.

A PEFT user's config line runs unchanged with the import switched::

    from llmkit.adapt import LoraConfig, get_peft_model      # was: from peft import ...
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)

Field names and defaults are peft 0.21's. Every entry point that takes a
config (:func:`~llmkit.adapt.apply_lora`, :func:`~llmkit.adapt.get_peft_model`,
:func:`~llmkit.adapt.prepare_qlora`, :func:`~llmkit.adapt.apply_prompt_tuning`)
also takes a real ``peft.LoraConfig`` / ``peft.PromptTuningConfig`` (read by
attribute; peft stays optional) or the dict of an ``adapter_config.json``:
:func:`as_lora_config` / :func:`as_prompt_tuning_config` convert.

What llmkit does not implement is refused, never ignored: a field that
changes what PEFT computes (``use_dora``, ``lora_bias``, ``bias`` other than
``"none"``, ``rank_pattern``, ``layers_to_transform``, ``modules_to_save``,
data-driven ``init_lora_weights`` such as ``"pissa"``, and any other PEFT
field away from its default) raises NotImplementedError naming the field.
So do task types for which PEFT trains a head beside the adapter
(``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``: PEFT's ``modules_to_save``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..nn.lora import check_init_lora_weights, check_lora_args

__all__ = ["LoraConfig", "PromptTuningConfig", "as_lora_config", "as_prompt_tuning_config",
           "DEFAULT_TARGET_MODULES"]

# peft 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: the modules LoRA targets when
# target_modules is None, by transformers' config.model_type.
DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

# PEFT task types whose PeftModel trains and saves a head beside the adapter (modules_to_save).
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
_LORA_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION") + _HEAD_TASKS

# PEFT fields llmkit does not have and that change nothing at their default, or are bookkeeping:
# ignored when a config (a peft object or a saved JSON) carries them.
_INERT = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config",
          "tokenizer_kwargs", "target_modules_to_tie"}


def _enum_value(value: Any) -> Any:
    """PEFT's enums (TaskType.CAUSAL_LM, PeftType.LORA) as their strings."""
    return getattr(value, "value", value)


def _is_default_like(value: Any) -> bool:
    """Empty / off values of the PEFT fields llmkit leaves out."""
    if value is None or value is False:
        return True
    if isinstance(value, (str, list, tuple, set, dict)) and len(value) == 0:
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_is_default_like(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` (peft 0.21 names and defaults), for :func:`~llmkit.adapt.apply_lora`.

    Implemented: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``target_modules`` (names: suffix match; a string: regex full match;
    ``"all-linear"``; None: PEFT's default for the model type),
    ``exclude_modules`` (same matching), ``init_lora_weights`` (True, False,
    ``"gaussian"``), ``inference_mode`` (adapters frozen), ``fan_in_fan_out``
    (set from the layer type: GPT-2's Conv1D), ``task_type``,
    ``base_model_name_or_path`` and ``revision`` (recorded in the saved config).
    The other fields exist so PEFT code constructs unchanged; set away from
    their defaults they raise NotImplementedError naming the field.
    """

    task_type: Optional[str] = None
    peft_type: str = "LORA"
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = None
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    loftq_config: Optional[dict] = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    use_dora: bool = False
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    layer_replication: Optional[list] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    ensure_weight_tying: bool = False

    def __post_init__(self):
        self.peft_type = str(_enum_value(self.peft_type))
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig has peft_type {self.peft_type!r}; it must be 'LORA'")
        self.task_type = None if self.task_type is None else str(_enum_value(self.task_type))
        if self.task_type is not None and self.task_type not in _LORA_TASKS:
            raise ValueError(f"task_type must be one of {_LORA_TASKS} or None, got {self.task_type!r}")
        if self.task_type in _HEAD_TASKS:
            raise NotImplementedError(
                f"task_type={self.task_type!r}: PEFT trains and saves the task head beside the adapter for this "
                "task (modules_to_save), which llmkit's LoRA does not; use task_type=None (adapter only) and "
                "train the head yourself, or CAUSAL_LM / SEQ_2_SEQ_LM / FEATURE_EXTRACTION")
        check_lora_args(self.r, self.lora_alpha, self.lora_dropout)
        self.init_lora_weights = check_init_lora_weights(self.init_lora_weights)
        self.target_modules = _check_modules("target_modules", self.target_modules)
        self.exclude_modules = _check_modules("exclude_modules", self.exclude_modules)
        if self.bias != "none":
            if self.bias not in ("all", "lora_only"):
                raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
            raise NotImplementedError(f"bias={self.bias!r} (training biases beside the adapter) is not implemented "
                                      "in llmkit; use bias='none'")
        unsupported = [f.name for f in dataclasses.fields(self) if f.name in _UNSUPPORTED
                       and not _is_default_like(getattr(self, f.name))]
        if unsupported:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in unsupported)
            raise NotImplementedError(f"LoraConfig field(s) not implemented in llmkit: {values} (leave "
                                      f"{'it' if len(unsupported) == 1 else 'them'} at PEFT's default)")

    def to_dict(self) -> dict:
        """The fields as ``adapter_config.json`` holds them (PEFT's ``to_dict``)."""
        out = dataclasses.asdict(self)
        if isinstance(out["target_modules"], tuple):
            out["target_modules"] = list(out["target_modules"])
        return out

    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


# Fields that exist for PEFT compatibility only: any non-default value is refused.
_UNSUPPORTED = ("modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
                "megatron_config", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
                "use_dora", "alora_invocation_tokens", "use_qalora", "layer_replication", "lora_bias",
                "target_parameters", "ensure_weight_tying")


def _check_modules(name: str, value):
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError(f"{name} is an empty string; give module names, a regex or 'all-linear'")
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not items or not all(isinstance(v, str) and v for v in items):
            raise TypeError(f"{name} must be a regex string or a non-empty list of module names, got {value!r}")
        return items
    raise TypeError(f"{name} must be a regex string, a list of module names or None, got {type(value).__name__}")


def _fields_of(config: Any, kind: str) -> dict:
    """The fields of a config object (a dataclass such as peft's, or a mapping) as a dict."""
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    raise TypeError(f"expected a {kind} (llmkit.adapt.{kind}, peft.{kind} or the dict of an adapter_config.json), "
                    f"got {type(config).__name__}")


def _source_defaults(config: Any) -> dict:
    """Field defaults of the config's own class (peft's), to tell a set field from a default one."""
    out = {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                try:
                    out[f.name] = f.default_factory()  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - a factory that needs arguments: no default known
                    pass
    return out


def _convert(config: Any, cls, kind: str, peft_type: str):
    if isinstance(config, cls):
        return config
    values = _fields_of(config, kind)
    got_type = _enum_value(values.pop("peft_type", None))
    if got_type is not None and str(got_type) != peft_type:
        raise ValueError(f"this is a {got_type!r} config; a {kind} (peft_type {peft_type!r}) is needed here")
    known = {f.name for f in dataclasses.fields(cls)}
    defaults = _source_defaults(config)
    extra = {}
    for name, value in values.items():
        if name in known or name in _INERT:
            continue
        if _is_default_like(value) or (name in defaults and _equal(value, defaults[name])):
            continue
        extra[name] = value
    if extra:
        raise NotImplementedError(f"{kind} field(s) not implemented in llmkit: "
                                  + ", ".join(f"{k}={v!r}" for k, v in extra.items()))
    kwargs = {k: v for k, v in values.items() if k in known}
    for key in ("task_type", "prompt_tuning_init"):
        if key in kwargs:
            kwargs[key] = _enum_value(kwargs[key])
    return cls(**kwargs)


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and odd objects: treat as different
        return False


def as_lora_config(config: Any) -> LoraConfig:
    """An llmkit :class:`LoraConfig` from ours, a ``peft.LoraConfig`` or a config dict; raises
    TypeError for something else, ValueError for another PEFT method, NotImplementedError
    for PEFT features llmkit does not implement."""
    return _convert(config, LoraConfig, "LoraConfig", "LORA")


@dataclass
class PromptTuningConfig:
    """PEFT's ``PromptTuningConfig`` (peft 0.21 names and defaults), for
    :func:`~llmkit.adapt.apply_prompt_tuning`. ``prompt_tuning_init``:
    ``"RANDOM"``, ``"TEXT"`` (needs ``prompt_tuning_init_text`` and a
    tokenizer: ``tokenizer_name_or_path`` or ``apply_prompt_tuning``'s
    ``tokenizer=``) or ``"SAMPLE_VOCAB"``. ``token_dim``, ``num_layers`` and
    ``num_attention_heads`` are filled from the model."""

    task_type: Optional[str] = None
    peft_type: str = "PROMPT_TUNING"
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self):
        self.peft_type = str(_enum_value(self.peft_type))
        if self.peft_type != "PROMPT_TUNING":
            raise ValueError(f"PromptTuningConfig has peft_type {self.peft_type!r}; it must be 'PROMPT_TUNING'")
        self.task_type = None if self.task_type is None else str(_enum_value(self.task_type))
        self.prompt_tuning_init = str(_enum_value(self.prompt_tuning_init)).upper()
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ValueError(f"prompt_tuning_init must be 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB', "
                             f"got {self.prompt_tuning_init!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise NotImplementedError(f"num_transformer_submodules={self.num_transformer_submodules} "
                                      "(encoder-decoder prompts) is not implemented in llmkit")
        if self.tokenizer_kwargs:
            raise NotImplementedError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is not implemented in llmkit; "
                                      "pass a configured tokenizer object as apply_prompt_tuning(tokenizer=...)")


def as_prompt_tuning_config(config: Any) -> PromptTuningConfig:
    """An llmkit :class:`PromptTuningConfig` from ours, a ``peft.PromptTuningConfig`` or a dict."""
    return _convert(config, PromptTuningConfig, "PromptTuningConfig", "PROMPT_TUNING")
