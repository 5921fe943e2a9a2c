"""llmkit.adapt: parameter-efficient adaptation of pretrained models (LoRA, QLoRA, soft prompts).

PEFT's names, configs and file formats throughout, so PEFT code runs with the
import switched: :class:`LoraConfig` / :class:`PromptTuningConfig` (PEFT's
fields and defaults; a real ``peft`` config works too), :func:`get_peft_model`
(or :func:`apply_lora`, which adapts the model in place and returns it),
named adapters (:func:`add_adapter`, :func:`set_adapter`,
:func:`delete_adapter`), ``with disable_adapter(model):`` (also
``model.disable_adapter()``), :func:`merge_lora` (``merge_and_unload``),
:func:`save_adapter` / :func:`load_adapter` (``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's key names and layout, both ways),
:func:`prepare_qlora` (bitsandbytes NF4 + LoRA in one call) and prompt
tuning (:func:`apply_prompt_tuning`, :func:`save_prompt`, :func:`load_prompt`).
"""

from .config import LoraConfig, PromptTuningConfig
from .lora import (active_adapter, add_adapter, apply_lora, delete_adapter, disable_adapter, find_target_modules,
                   get_nb_trainable_parameters, get_peft_model, lora_layers, merge_lora, print_trainable_parameters,
                   set_adapter, trainable_parameters, unload_lora)
from .peft_format import load_adapter, save_adapter
from .prompt_tuning import PromptTunedModel, SoftPrompt, apply_prompt_tuning, load_prompt, save_prompt
from .qlora import QLoRAMemoryReport, prepare_qlora, qlora_memory_report

__all__ = [
    "LoraConfig",
    "PromptTuningConfig",
    "get_peft_model",
    "apply_lora",
    "add_adapter",
    "set_adapter",
    "active_adapter",
    "delete_adapter",
    "disable_adapter",
    "merge_lora",
    "unload_lora",
    "trainable_parameters",
    "print_trainable_parameters",
    "get_nb_trainable_parameters",
    "find_target_modules",
    "lora_layers",
    "save_adapter",
    "load_adapter",
    "prepare_qlora",
    "qlora_memory_report",
    "QLoRAMemoryReport",
    "SoftPrompt",
    "PromptTunedModel",
    "apply_prompt_tuning",
    "save_prompt",
    "load_prompt",
]
