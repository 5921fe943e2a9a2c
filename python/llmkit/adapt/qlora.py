"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base quantized to NF4.

:func:`prepare_qlora` does in one call what bitsandbytes + PEFT do in three
(``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)``, ``prepare_model_for_kbit_training``,
``get_peft_model``): each targeted linear layer becomes a
:class:`~llmkit.nn.Linear4bit` (NF4, double quant, blocks of 64) wrapped in a
:class:`~llmkit.nn.LoraLinear`; everything but the adapters is frozen. The
LoRA settings are PEFT's ``LoraConfig`` fields (a config, or the fields as
keywords); without a config the paper's values are the defaults: r=64,
lora_alpha=16, lora_dropout=0.05, all linear layers. Layers that are not
targeted (the output head under "all-linear") stay in full precision, as
transformers leaves ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..nn.linear4bit import Linear4bit
from .config import LoraConfig
from .lora import ALL_LINEAR, _config_from_call, apply_lora, find_target_modules, lora_layers, replace_module

# The QLoRA paper's LoRA settings: the defaults when prepare_qlora gets no config.
QLORA_DEFAULTS = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ALL_LINEAR}


def prepare_qlora(model: nn.Module, config: LoraConfig | Any = None, adapter_name: str = "default",
                  compute_dtype=None, gradient_checkpointing: bool = False, blocksize: int = 64,
                  **fields: Any) -> nn.Module:
    """Quantize the targeted linear layers of `model` to NF4 and put LoRA on
    them (in place); returns `model`.

    Args:
        config: a :class:`~llmkit.adapt.LoraConfig` or ``peft.LoraConfig`` --
            or none, and its fields as keywords (``r``, ``lora_alpha``,
            ``lora_dropout``, ``target_modules``, ``use_rslora``, ...; default
            the paper's: r=64, lora_alpha=16, lora_dropout=0.05, "all-linear").
        adapter_name: as :func:`~llmkit.adapt.apply_lora`.
        compute_dtype: dtype of the 4-bit matmuls (bitsandbytes'
            ``bnb_4bit_compute_dtype``); default each layer's weight dtype.
        gradient_checkpointing: call transformers'
            ``model.gradient_checkpointing_enable`` (``activation_checkpointing_enable``
            in transformers 5) with ``use_reentrant=False``, so the frozen
            embedding needs no ``requires_grad`` inputs hook.
        blocksize: NF4 block size (double quant always on, blocks of 256).
    """
    # Check everything before the first layer is quantized: an error leaves the model as it was.
    if config is None:
        fields = {**QLORA_DEFAULTS, **fields}
    config = _config_from_call(config, fields, "prepare_qlora")
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; prepare_qlora takes a plain model")
    if gradient_checkpointing and not any(callable(getattr(model, name, None)) for name in (
            "activation_checkpointing_enable", "gradient_checkpointing_enable")):
        raise TypeError(f"gradient_checkpointing=True needs a model with gradient_checkpointing_enable() "
                        f"(transformers' PreTrainedModel); {type(model).__name__} has none")
    names = find_target_modules(model, config.target_modules, config.exclude_modules)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, Linear4bit):
            replace_module(model, name, Linear4bit.from_linear(module, compute_dtype=compute_dtype,
                                                               blocksize=blocksize, double_quant=True))
    apply_lora(model, config, adapter_name=adapter_name)  # the same targets: the quantized layers
    if gradient_checkpointing:
        # transformers 5 renamed it activation_checkpointing_enable (the old name warns).
        if callable(getattr(model, "activation_checkpointing_enable", None)):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass
class QLoRAMemoryReport:
    """Memory of a QLoRA model, in bytes.

    ``bytes_per_base_param`` = (packed codes + absmax + nested absmax and
    offset) / number of quantized weights; the 16-entry NF4 and 256-entry
    dynamic code tables are shared constants and not counted. NF4 with double
    quant at blocksize 64 is 0.5 + 1/64 + 4/(64*256) ~ 0.516 bytes (4.127 bits).
    """

    quantized_params: int  # weights stored in NF4
    quantized_bytes: int  # their packed codes + quantization state
    lora_params: int
    lora_bytes: int
    other_params: int  # everything else (embeddings, norms, unquantized head, biases)
    other_bytes: int

    @property
    def bytes_per_base_param(self) -> float:
        return self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.lora_bytes + self.other_bytes

    def __str__(self) -> str:
        return (f"NF4 base: {self.quantized_params:,d} params in {self.quantized_bytes:,d} bytes "
                f"({self.bytes_per_base_param:.4f} bytes/param) || LoRA: {self.lora_params:,d} params in "
                f"{self.lora_bytes:,d} bytes || other: {self.other_params:,d} params in {self.other_bytes:,d} bytes "
                f"|| total {self.total_bytes:,d} bytes")


def qlora_memory_report(model: nn.Module) -> QLoRAMemoryReport:
    """Count the bytes of the NF4 base, the adapters and the rest of `model`
    (parameters and buffers, shared tensors once)."""
    quant_params = quant_bytes = lora_params = lora_bytes = 0
    special: set[int] = set()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            quant_params += m.quant_state.numel
            quant_bytes += m.nbytes()
            special.add(id(m.weight))
    for layer in lora_layers(model).values():
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
            lora_params += p.numel()
            lora_bytes += p.numel() * p.element_size()
            special.add(id(p))
    other_params = other_bytes = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in special or id(t) in seen:
            continue
        seen.add(id(t))
        other_params += t.numel()
        other_bytes += t.numel() * t.element_size()
    return QLoRAMemoryReport(quant_params, quant_bytes, lora_params, lora_bytes, other_params, other_bytes)


__all__ = ["prepare_qlora", "qlora_memory_report", "QLoRAMemoryReport", "QLORA_DEFAULTS"]
