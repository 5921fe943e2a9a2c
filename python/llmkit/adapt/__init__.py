"""llmkit.adapt: parameter-efficient adaptation of pretrained models (LoRA, QLoRA, soft prompts).

PEFT's conventions and file formats throughout: :func:`apply_lora` /
:func:`merge_lora` (``get_peft_model`` / ``merge_and_unload``),
:func:`save_adapter` / :func:`load_adapter` (``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's key names, both ways),
:func:`prepare_qlora` (bitsandbytes NF4 + LoRA in one call) and prompt
tuning (:func:`apply_prompt_tuning`, :func:`save_prompt`, :func:`load_prompt`).
"""

from .lora import apply_lora, find_target_modules, lora_layers, merge_lora, trainable_parameters
from .peft_format import load_adapter, save_adapter
from .prompt_tuning import PromptTunedModel, SoftPrompt, apply_prompt_tuning, load_prompt, save_prompt
from .qlora import QLoRAMemoryReport, prepare_qlora, qlora_memory_report

__all__ = [
    "apply_lora",
    "merge_lora",
    "trainable_parameters",
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
