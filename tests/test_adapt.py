"""apply_lora / merge_lora / PEFT adapter files / prepare_qlora on small
transformers models built from configs, against PEFT on identical weights."""

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

from llmkit.adapt.lora import apply_lora, find_target_modules, lora_layers, merge_lora, trainable_parameters
from llmkit.adapt.peft_format import load_adapter, save_adapter
from llmkit.adapt.qlora import prepare_qlora, qlora_memory_report
from llmkit.nn import Linear4bit, LoraLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 100


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


def randomize_B(model, std=0.1):
    """PEFT's init makes B zero (a no-op adapter): make every adapter matter."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, std)


def get_peft(base, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for GPT-2
        return peft.get_peft_model(base, peft.LoraConfig(**kwargs))


def copy_adapters_to_peft(ours, peft_model):
    modules = dict(peft_model.base_model.model.named_modules())
    for name, layer in lora_layers(ours).items():
        with torch.no_grad():
            modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            modules[name].lora_B["default"].weight.copy_(layer.lora_B)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ids(seed=1, batch=2, seqlen=9):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [llama, gpt2])
def test_apply_lora_all_linear_matches_peft(make):
    base = make()
    ours = apply_lora(copy.deepcopy(base), "all-linear", r=4, alpha=8)
    randomize_B(ours)
    ref = get_peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules="all-linear")
    assert sorted(lora_layers(ours)) == sorted(ref.peft_config["default"].target_modules)
    assert not any("lm_head" in n for n in lora_layers(ours))
    copy_adapters_to_peft(ours, ref)
    assert tuple(trainable_parameters(ours).__dict__.values()) == ref.get_nb_trainable_parameters()

    x = ids()
    ours.train(), ref.train()  # dropout is 0: training mode only exercises the training path
    y1, y2 = ours(x).logits, ref(x).logits
    assert rel_err(y1, y2) < 1e-5
    assert rel_err(y1, base(x).logits) > 1e-2  # the adapters change the output
    y1.square().mean().backward()
    y2.square().mean().backward()
    ref_modules = dict(ref.base_model.model.named_modules())
    for name, layer in lora_layers(ours).items():
        assert rel_err(layer.lora_A.grad, ref_modules[name].lora_A["default"].weight.grad) < 1e-4, name
        assert rel_err(layer.lora_B.grad, ref_modules[name].lora_B["default"].weight.grad) < 1e-4, name
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_target_modules_names_and_regex_match_peft():
    base = llama()
    for spec in (["q_proj", "v_proj"], r".*\.(q|v)_proj", ["layers.1.mlp.down_proj"]):
        ours = apply_lora(copy.deepcopy(base), spec, r=2)
        ref = get_peft(copy.deepcopy(base), r=2, target_modules=spec)
        peft_names = sorted(n for n, m in ref.base_model.model.named_modules() if hasattr(m, "lora_A"))
        assert sorted(lora_layers(ours)) == peft_names, spec
    assert len(lora_layers(apply_lora(copy.deepcopy(base), ["q_proj"]))) == 2


def test_apply_lora_freezes_all_but_adapters_and_reports():
    model = apply_lora(llama(), ["q_proj", "v_proj"], r=8, alpha=16, rslora=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in lora_layers(model) for w in ("lora_A", "lora_B")}
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.scaling == 16 / 8 ** 0.5
    report = trainable_parameters(model)
    assert report.trainable == 2 * 8 * (64 + 64) + 2 * 8 * (64 + 32)  # 2 layers of q: 64->64, v: 64->32 (2 kv heads)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert str(report).startswith(f"trainable params: {report.trainable:,d} || all params: {report.total:,d}")


def test_merge_lora_restores_plain_layers():
    base = llama()
    x = ids()
    model = apply_lora(copy.deepcopy(base), "all-linear", r=4)
    randomize_B(model)
    before = model(x).logits
    merged = merge_lora(model)
    assert merged is model and not lora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(model.state_dict()) == set(base.state_dict())
    after = model(x).logits
    assert rel_err(after, before) < 1e-5
    assert rel_err(after, base(x).logits) > 1e-2


def test_merge_unmerge_round_trip_in_a_model():
    base = gpt2()
    model = apply_lora(copy.deepcopy(base), "all-linear", r=4)
    randomize_B(model)
    x = ids()
    before = model(x).logits
    for layer in lora_layers(model).values():
        layer.merge()
    assert rel_err(model(x).logits, before) < 1e-5
    for layer in lora_layers(model).values():
        layer.unmerge()
    base_sd = base.state_dict()
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base_sd[name + ".weight"], rtol=1e-6, atol=1e-6)


def test_apply_lora_bad_input():
    model = llama()
    with pytest.raises(ValueError, match="r must"):
        apply_lora(model, r=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        apply_lora(model, alpha=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        apply_lora(model, alpha=-1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_lora(model, dropout=1.0)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        apply_lora(model, ["query", "value"])
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(model, r"q_proj")  # a regex must match the whole name
    with pytest.raises(TypeError, match="LlamaMLP"):
        apply_lora(model, ["mlp"])
    with pytest.raises(TypeError, match="target_modules"):
        apply_lora(model, [])
    assert not lora_layers(model)  # nothing was half-applied
    apply_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["v_proj"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(llama())


# ----------------------------------------------------------- PEFT files --


@pytest.mark.parametrize("make", [llama, gpt2])
def test_save_adapter_loads_in_peft(make, tmp_path):
    base = make()
    ours = apply_lora(copy.deepcopy(base), "all-linear", r=4, alpha=16, dropout=0.1)
    randomize_B(ours)
    save_adapter(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["fan_in_fan_out"] == (make is gpt2)
    tensors = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model." + next(iter(lora_layers(ours))) + ".lora_A.weight" in tensors

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ref.peft_config["default"].lora_dropout == 0.1
    x = ids()
    ours.eval(), ref.eval()
    assert rel_err(ours(x).logits, ref(x).logits) < 1e-5
    assert rel_err(ours(x).logits, base(x).logits) > 1e-2


@pytest.mark.parametrize("make", [llama, gpt2])
def test_load_adapter_reads_peft_save_pretrained(make, tmp_path):
    base = make()
    ref = get_peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]
                   if make is llama else ["c_attn", "c_fc"], init_lora_weights=False)
    ref.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)  # applies LoRA from the config
    assert len(lora_layers(ours)) == len([m for m in ref.modules() if hasattr(m, "lora_A")])
    x = ids()
    ref.eval()
    assert rel_err(ours(x).logits, ref(x).logits) < 1e-5
    assert rel_err(ours(x).logits, base(x).logits) > 1e-2
    # into existing adapters: new weights, same result
    again = apply_lora(copy.deepcopy(base), ["q_proj", "o_proj"] if make is llama else ["c_attn", "c_fc"], r=4)
    assert rel_err(again(x).logits, base(x).logits) < 1e-6
    load_adapter(again, tmp_path)
    assert rel_err(again(x).logits, ref(x).logits) < 1e-5


def test_adapter_round_trip_ours_to_ours(tmp_path):
    base = llama()
    a = apply_lora(copy.deepcopy(base), r".*\.(q|v|down)_proj", r=4, rslora=True)
    randomize_B(a)
    save_adapter(a, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*\.(q|v|down)_proj" and config["use_rslora"]
    b = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(lora_layers(b)) == sorted(lora_layers(a))
    for name, layer in lora_layers(b).items():
        assert torch.equal(layer.lora_B, lora_layers(a)[name].lora_B)
        assert layer.scaling == lora_layers(a)[name].scaling


def test_save_adapter_is_atomic(tmp_path, monkeypatch):
    import llmkit.adapt.peft_format as pf

    model = apply_lora(llama(), ["q_proj"], r=2)
    randomize_B(model)
    save_adapter(model, tmp_path)
    files = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    other = apply_lora(llama(seed=5), ["q_proj", "v_proj"], r=4)

    def interrupt(*args):
        raise KeyboardInterrupt("interrupted mid-save")

    # interrupted after the new weights are written, before the config is
    real_write_temp = pf._write_temp
    monkeypatch.setattr(pf, "_write_temp", lambda directory, name, write: interrupt() if name == pf.CONFIG_NAME
                        else real_write_temp(directory, name, write))
    with pytest.raises(KeyboardInterrupt):
        save_adapter(other, tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == files  # untouched, no temp left

    # interrupted at the first rename
    monkeypatch.setattr(pf, "_write_temp", real_write_temp)
    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(other, tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == files
    monkeypatch.undo()
    save_adapter(other, tmp_path)  # and a save that completes replaces both
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4


def test_load_adapter_bad_input(tmp_path):
    base = llama()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")
    model = apply_lora(copy.deepcopy(base), ["q_proj"], r=4)
    save_adapter(model, tmp_path)

    # the adapter's rank does not fit the model's LoRA layers
    with pytest.raises(ValueError, match="r=2"):
        load_adapter(apply_lora(copy.deepcopy(base), ["q_proj"], r=2), tmp_path)

    # a tensor of the wrong shape: the message names the key and both shapes
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 4)
    safetensors_torch.save_file(tensors, path)
    with pytest.raises(ValueError, match=r"q_proj\.lora_B\.weight.*\(32, 4\).*\(64, 4\)"):
        load_adapter(copy.deepcopy(base), tmp_path)

    # a tensor for a module the model does not have
    tensors[key] = torch.zeros(64, 4)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    safetensors_torch.save_file(tensors, path)
    with pytest.raises(ValueError, match="layers.7"):
        load_adapter(copy.deepcopy(base), tmp_path)

    os.remove(path)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(copy.deepcopy(base), tmp_path)

    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, peft_type="PROMPT_TUNING")))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        load_adapter(copy.deepcopy(base), tmp_path)
    config_path.write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(NotImplementedError, match="use_dora"):
        load_adapter(copy.deepcopy(base), tmp_path)


# ------------------------------------------------------------------ QLoRA --


def test_prepare_qlora_structure_memory_and_outputs():
    base = llama()
    model = prepare_qlora(copy.deepcopy(base), r=8, alpha=16, dropout=0.05)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(find_target_modules(base, "all-linear"))
    assert all(isinstance(layer.base_layer, Linear4bit) and layer.base_layer.double_quant for layer in layers.values())
    assert type(model.lm_head) is nn.Linear  # the output head stays in full precision
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}" for n in layers for w in ("lora_A", "lora_B")}

    report = qlora_memory_report(model)
    n = sum(m.weight.numel() for name, m in base.named_modules() if name in layers)
    assert report.quantized_params == n
    assert report.bytes_per_base_param <= 0.53
    # 4 bits + one uint8 absmax per 64 + fp32 nested absmax per 256 blocks + offset, per layer
    expect = sum(w.numel() // 2 + w.numel() // 64 + 4 * -(-w.numel() // (64 * 256)) + 4
                 for w in (m.weight for name, m in base.named_modules() if name in layers))
    assert report.quantized_bytes == expect
    assert report.lora_params == sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
    assert report.total_bytes == report.quantized_bytes + report.lora_bytes + report.other_bytes

    # the 4-bit model is the dense model with dequantized weights plus the same adapters
    randomize_B(model)
    dense = copy.deepcopy(base)
    for name, layer in layers.items():
        dense.get_submodule(name).weight.data = layer.base_layer.dequantize()
    dense = apply_lora(dense, list(layers), r=8, alpha=16)
    for name, layer in lora_layers(dense).items():
        layer.lora_A.data, layer.lora_B.data = layers[name].lora_A.data.clone(), layers[name].lora_B.data.clone()
    x = ids()
    model.eval(), dense.eval()
    assert rel_err(model(x).logits, dense(x).logits) < 1e-5
    assert rel_err(model(x).logits, base(x).logits) > 1e-2


def test_prepare_qlora_gpt2_trains_with_gradient_checkpointing():
    model = prepare_qlora(gpt2(), r=4, alpha=8, dropout=0.0, gradient_checkpointing=True, compute_dtype=torch.float32)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(model).values())
    randomize_B(model)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it activation_checkpointing
        plain.gradient_checkpointing_disable()
    calls = []
    for m in (model, plain):
        m.train()
        counter = []
        hook = m.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *args, c=counter: c.append(1))
        m(ids(), labels=ids()).loss.backward()
        hook.remove()
        calls.append(len(counter))
    assert calls == [2, 1]  # checkpointed: the layer's forward runs again in the backward
    for (name, a), (_, b) in zip(lora_layers(model).items(), lora_layers(plain).items()):
        assert a.lora_A.grad is not None and a.lora_A.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-5, atol=1e-7)


def test_qlora_adapter_round_trips_through_files(tmp_path):
    base = llama()
    model = prepare_qlora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_B(model)
    save_adapter(model, tmp_path)
    reloaded = load_adapter(prepare_qlora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                            tmp_path)
    x = ids()
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="rounding"):
        merge_lora(model)
    assert all(type(model.get_submodule(n)) is Linear4bit for n in find_target_modules(base, ["q_proj", "v_proj"]))


def test_qlora_model_state_dict_round_trip():
    targets = ["q_proj", "down_proj"]
    a = prepare_qlora(llama(), r=4, target_modules=targets)
    randomize_B(a)
    sd = a.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.base_layer.weight.quant_state.bitsandbytes__nf4" in sd
    b = prepare_qlora(llama(seed=3), r=4, target_modules=targets)
    x = ids()
    a.eval(), b.eval()
    assert rel_err(b(x).logits, a(x).logits) > 1e-2
    b.load_state_dict(sd)
    torch.testing.assert_close(b(x).logits, a(x).logits, rtol=0, atol=0)


def test_prepare_qlora_bad_input():
    with pytest.raises(ValueError, match="r must"):
        prepare_qlora(llama(), r=0)
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        prepare_qlora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), gradient_checkpointing=True)
    with pytest.raises(ValueError, match="already has LoRA"):
        prepare_qlora(apply_lora(llama(), ["q_proj"]))
