"""Named adapters and disable_adapter on models adapted by llmkit, against PEFT's PeftModel.

``with model.disable_adapter():`` must give the base model's logits (DPO's
reference model) with no gradient reaching the adapters, also under the
fused op in training mode with dropout and over an NF4 base, and must put
everything back on exit, exceptions included; a merged model is refused.
Several adapters on one model: the active one computes and trains, as in
PEFT (same logits on the same weights, same trainable set), and
delete_adapter leaves the model as if the adapter had never been added.
"""

import copy

import pytest
import torch

from llmkit.adapt import (LoraConfig, active_adapter, add_adapter, apply_lora, delete_adapter, disable_adapter,
                          lora_layers, merge_lora, prepare_qlora, set_adapter)
from lora_reference import (against_reference_and_peer, copy_adapters_to_peft, get_peft, gpt2, ids, llama,
                            randomize_B, reference_logits, rel_err)

peft = pytest.importorskip("peft")


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("make", [llama, gpt2])
def test_disable_adapter_gives_base_logits_and_no_adapter_gradients(make):
    base = make()
    model = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4, lora_dropout=0.2)
    randomize_B(model)
    model.train()  # the fused op's training path, dropout on
    x = ids()
    with model.disable_adapter():
        out = model(x, labels=x)
        assert not out.logits.requires_grad  # no graph: the adapters took no part
        torch.testing.assert_close(out.logits, base.train()(x).logits, rtol=1e-6, atol=1e-6)
        embedding = model.get_input_embeddings().weight
        embedding.requires_grad_(True)  # something trainable outside the adapters, so backward runs
        model(x, labels=x).loss.backward()
        embedding.requires_grad_(False)
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    assert all(g is None for g in lora_grads(model).values())  # nothing reached the adapters
    assert rel_err(model(x).logits, base(x).logits) > 1e-2  # on again after the block
    model(x, labels=x).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model).values())


def test_disable_adapter_matches_peft_and_restores_on_exception():
    base = llama()
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=4)
    randomize_B(ours)
    ref = get_peft(copy.deepcopy(base), r=4, target_modules=["q_proj", "v_proj"])
    copy_adapters_to_peft(ours, ref)
    x = ids()
    base_logits = base(x).logits
    with ours.disable_adapter(), ref.disable_adapter():
        against_reference_and_peer(ours(x).logits, ref(x).logits, base.double()(x).logits, 1e-5,
                                   "disable_adapter logits")
    base.float()
    with pytest.raises(KeyError):
        with disable_adapter(ours):  # the function form, same context
            raise KeyError("interrupted")
    assert not any(layer.disable_adapters for layer in lora_layers(ours).values())
    assert rel_err(ours(x).logits, reference_logits(base, ours, x)) < 1e-5
    with ours.disable_adapter():  # nested: the outer block still disables after the inner one ends
        with ours.disable_adapter():
            pass
        torch.testing.assert_close(ours(x).logits, base_logits, rtol=1e-6, atol=1e-6)


def test_disable_adapter_over_nf4_and_refused_when_merged():
    base = llama()
    model = prepare_qlora(copy.deepcopy(base), r=4, target_modules=["q_proj", "o_proj"])
    randomize_B(model)
    plain = copy.deepcopy(model)
    for name, layer in lora_layers(plain).items():  # the NF4 base alone
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer.base_layer)
    x = ids()
    with model.disable_adapter():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)
    assert rel_err(model(x).logits, plain(x).logits) > 1e-2

    dense = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4)
    randomize_B(dense)
    next(iter(lora_layers(dense).values())).merge()
    with pytest.raises(ValueError, match="merged into its base weight.*unmerge"):
        with dense.disable_adapter():
            pass
    assert not any(layer.disable_adapters for layer in lora_layers(dense).values())
    with pytest.raises(ValueError, match="no LoRA layers"):
        with disable_adapter(merge_lora(dense)):
            pass


def test_named_adapters_match_peft():
    base = llama()
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4)
    ours.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "q_proj"]))
    ref = get_peft(copy.deepcopy(base), r=4, target_modules=["q_proj"])
    ref.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "q_proj"]))
    assert set(ours.state_dict()) == set(ref.base_model.model.state_dict())
    randomize_B(ours)
    for name in ("default", "other"):
        copy_adapters_to_peft(ours, ref, name)
    x = ids()

    def trainable(model):
        return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}

    assert ours.active_adapter == ref.active_adapter == "default"  # add_adapter does not switch
    assert trainable(ours) == trainable(ref)
    against_reference_and_peer(ours(x).logits, ref(x).logits, reference_logits(base, ours, x, "default"), 1e-5,
                               "two adapters, default active")
    ours.set_adapter("other")
    ref.set_adapter("other")
    assert active_adapter(ours) == "other" and trainable(ours) == trainable(ref)
    assert all("other" in n for n in trainable(ours))
    against_reference_and_peer(ours(x).logits, ref(x).logits, reference_logits(base, ours, x, "other"), 1e-5,
                               "two adapters, other active")
    ours.delete_adapter("other")
    ref.delete_adapter("other")
    assert ours.active_adapter == ref.active_adapter == "default"
    assert trainable(ours) == trainable(ref)
    assert rel_err(ours(x).logits, reference_logits(base, ours, x, "default")) < 1e-5
    # v_proj held only "other": it is a plain layer again (PEFT keeps an empty wrapper there)
    assert sorted(lora_layers(ours)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_delete_last_adapter_and_bad_input():
    base = llama()
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4)
    randomize_B(model)
    with pytest.raises(ValueError, match="no adapter 'x'.*default"):
        set_adapter(model, "x")
    with pytest.raises(ValueError, match="no adapter 'x'"):
        delete_adapter(model, "x")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_adapter(model, "default", target_modules=["v_proj"])
    with pytest.raises(ValueError, match="adapter_name"):
        add_adapter(model, "a/b", target_modules=["v_proj"])
    with pytest.raises(TypeError, match="lora_alpha="):
        add_adapter(model, "b", target_modules=["v_proj"], alpha=2)
    with pytest.raises(ValueError, match="matched no module"):
        add_adapter(model, "b", target_modules=["nope"])
    assert list(model.llmkit_lora.configs) == ["default"]  # refused calls changed nothing
    add_adapter(model, "b", target_modules=["q_proj"])
    next(iter(lora_layers(model).values())).merge()
    with pytest.raises(ValueError, match="unmerge"):
        set_adapter(model, "b")
    next(iter(lora_layers(model).values())).unmerge()
    delete_adapter(model, "default")
    assert model.active_adapter == "b"  # the first remaining adapter takes over
    delete_adapter(model, "b")
    assert not lora_layers(model) and not hasattr(model, "disable_adapter")
    x = ids()
    assert rel_err(model(x).logits, base(x).logits) < 1e-6
    with pytest.raises(ValueError, match="no LoRA adapters"):
        set_adapter(model, "default")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        add_adapter(llama(), "b", target_modules=["q_proj"])


def test_model_methods_survive_copy_and_pickle(tmp_path):
    model = apply_lora(llama(), target_modules=["q_proj"], r=2)
    clone = copy.deepcopy(model)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    for m in (clone, loaded):
        with m.disable_adapter():  # acts on the copy, not the original
            assert all(layer.disable_adapters for layer in lora_layers(m).values())
            assert not any(layer.disable_adapters for layer in lora_layers(model).values())
        assert not any(layer.disable_adapters for layer in lora_layers(m).values())
        m.add_adapter("b", target_modules=["v_proj"])
        assert "b" in m.llmkit_lora.configs and "b" not in model.llmkit_lora.configs
