"""Shared by the LoRA model-level tests: tiny transformers models, a float64 reference, peer checks.

The reference of a LoRA model is its base model in float64 with every
adapter folded into its weight in float64 (``W + scaling * B @ A``): logits
of llmkit's model are asserted against it; PEFT's model is checked against
it too, and a test skips (naming PEFT, its version, the CPU capability and
the case) where PEFT is wrong, after llmkit's own check has passed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from llmkit.adapt import lora_layers

transformers = pytest.importorskip("transformers")

VOCAB = 100
CPU = torch.backends.cpu.get_cpu_capability()


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids(seed=1, batch=2, seqlen=9):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_B(model, adapter_name=None, std=0.1):
    """PEFT's init makes B zero (a no-op adapter): make every adapter (or `adapter_name`'s) matter."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name, linear in layer.lora_B.items():
                if adapter_name is None or name == adapter_name:
                    linear.weight.normal_(0, std)


def reference_logits(base, adapted, x, adapter_name="default"):
    """Float64 logits of `base` with the adapter `adapter_name` of `adapted` folded into its weights."""
    ref = copy.deepcopy(base).double().eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(adapted, adapter_name).items():
            delta = layer.scaling[adapter_name] * (layer.lora_B[adapter_name].weight.double()
                                                    @ layer.lora_A[adapter_name].weight.double())
            weight = modules[name].weight
            weight.add_(delta.T if layer.fan_in_fan_out else delta)
        return ref(x).logits


def get_peft(base, **kwargs):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for GPT-2
        return peft.get_peft_model(base, peft.LoraConfig(**kwargs))


def copy_adapters_to_peft(ours, peft_model, adapter_name="default"):
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours, adapter_name).items():
            modules[name].lora_A[adapter_name].weight.copy_(layer.lora_A[adapter_name].weight)
            modules[name].lora_B[adapter_name].weight.copy_(layer.lora_B[adapter_name].weight)


def check_peer(peer_out, ref_out, rel, case):
    """Skip (PEFT wrong here, not llmkit) unless PEFT's result is within `rel` of the reference."""
    peft = pytest.importorskip("peft")
    err = rel_err(peer_out, ref_out)
    if not err < rel:
        pytest.skip(f"peer wrong on this machine (llmkit's own checks passed): peft {peft.__version__}, "
                    f"transformers {transformers.__version__}, CPU capability {CPU}: {case}: rel err {err:.2g} vs "
                    f"the float64 reference, bound {rel:g}")


def against_reference_and_peer(ours_out, peer_out, ref_out, rel, case):
    """llmkit against the reference (asserted), the peer against it (skip where wrong), then the two."""
    assert rel_err(ours_out, ref_out) < rel, (case, rel_err(ours_out, ref_out))
    check_peer(peer_out, ref_out, rel, case)
    assert rel_err(ours_out, peer_out) < 2 * rel, (case, rel_err(ours_out, peer_out))
