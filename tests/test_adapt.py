"""apply_lora / get_peft_model / LoraConfig / merge_lora / prepare_qlora on small transformers models.

Models are built from configs with fresh weights; adapters get random B so
they matter. llmkit's logits and gradients are checked against a float64
reference (the base model with the adapters folded into its weights), then
against PEFT on identical weights where PEFT agrees with that reference.
A PEFT user's config code runs unchanged with the import switched.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from llmkit.adapt import (LoraConfig, apply_lora, find_target_modules, get_peft_model, lora_layers, merge_lora,
                          prepare_qlora, qlora_memory_report, trainable_parameters, unload_lora)
from llmkit.adapt.config import as_lora_config
from llmkit.nn import Linear4bit, LoraLinear
from lora_reference import (against_reference_and_peer, copy_adapters_to_peft, get_peft, gpt2, ids, llama,
                            randomize_B, reference_logits, rel_err)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("make", [llama, gpt2])
def test_apply_lora_all_linear_matches_reference_and_peft(make):
    base = make()
    ours = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4, lora_alpha=8)
    randomize_B(ours)
    ref = get_peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules="all-linear")
    assert sorted(lora_layers(ours)) == sorted(ref.peft_config["default"].target_modules)
    assert not any("lm_head" in n for n in lora_layers(ours))
    copy_adapters_to_peft(ours, ref)
    assert tuple(trainable_parameters(ours).__dict__.values()) == ref.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    # PEFT's in-memory layout: the same state_dict keys as PEFT's wrapped model
    assert set(ours.state_dict()) == set(ref.base_model.model.state_dict())

    x = ids()
    ours.train(), ref.train()  # dropout is 0: training mode only exercises the training path
    y1, y2 = ours(x).logits, ref(x).logits
    against_reference_and_peer(y1, y2, reference_logits(base, ours, x), 1e-5, f"{make.__name__} all-linear logits")
    assert rel_err(y1, base(x).logits) > 1e-2  # the adapters change the output
    y1.square().mean().backward()
    y2.square().mean().backward()
    ref_modules = dict(ref.base_model.model.named_modules())
    for name, layer in lora_layers(ours).items():
        for which in ("lora_A", "lora_B"):
            got = getattr(layer, which)["default"].weight.grad
            assert rel_err(got, getattr(ref_modules[name], which)["default"].weight.grad) < 1e-4, name
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_lora_gradients_match_float64_reference():
    """dL/dA, dL/dB of llmkit's model against autograd through the float64 merged reference."""
    base = llama()
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "down_proj"], r=3, lora_alpha=5)
    randomize_B(ours)
    x = ids(seqlen=7)
    ours(x).logits.square().mean().backward()
    ref = copy.deepcopy(base).double()
    modules = dict(ref.named_modules())
    params = {}
    for name, layer in lora_layers(ours).items():
        A = layer.lora_A["default"].weight.detach().double().requires_grad_()
        B = layer.lora_B["default"].weight.detach().double().requires_grad_()
        params[name] = (A, B)
        module, scaling = modules[name], layer.scaling["default"]
        w0 = module.weight.detach()
        del module.weight  # weight becomes a function of A and B
        module.weight = w0 + scaling * B @ A
    ref(x).logits.square().mean().backward()
    for name, layer in lora_layers(ours).items():
        assert rel_err(layer.lora_A["default"].weight.grad, params[name][0].grad) < 1e-4, name
        assert rel_err(layer.lora_B["default"].weight.grad, params[name][1].grad) < 1e-4, name


def test_peft_users_config_code_runs_unchanged():
    """The PEFT call site with llmkit's import: same trainable set, same logits as PEFT's."""
    base = llama()
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    assert isinstance(model, transformers.LlamaForCausalLM)  # the same model object, adapted in place
    peft_config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                                  bias="none", task_type="CAUSAL_LM")
    ref = peft.get_peft_model(copy.deepcopy(base), peft_config)
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert model.active_adapter == ref.active_adapter == "default"
    randomize_B(model)
    copy_adapters_to_peft(model, ref)
    model.eval(), ref.eval()
    x = ids()
    against_reference_and_peer(model(x).logits, ref(x).logits, reference_logits(base, model, x), 1e-5,
                               "LoraConfig(r=16, q/v) logits")
    # a real peft.LoraConfig works in llmkit's entry points too
    same = apply_lora(copy.deepcopy(base), peft_config)
    assert sorted(lora_layers(same)) == sorted(lora_layers(model))
    layer = next(iter(lora_layers(same).values()))
    assert (layer.r["default"], layer.scaling["default"], layer.lora_dropout["default"]) == (16, 2.0, 0.05)


def test_lora_config_fields_and_defaults_are_peft_s():
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    ours = dataclasses.fields(LoraConfig)
    assert {f.name for f in ours} <= set(theirs)
    for f in ours:
        t = theirs[f.name]
        mine = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        their = t.default if t.default is not dataclasses.MISSING else t.default_factory()
        if f.name == "peft_type":  # None in the field, set to LORA by PEFT's __post_init__
            assert mine == "LORA" and peft.LoraConfig().peft_type == "LORA"
            continue
        assert mine == their, f.name


def test_target_modules_names_regex_default_and_exclude_match_peft():
    base = llama()
    cases = [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=r".*\.(q|v)_proj"),
             dict(target_modules=["layers.1.mlp.down_proj"]), dict(),  # None: PEFT's default for llama
             dict(target_modules="all-linear", exclude_modules=["o_proj", "layers.1.mlp.up_proj"]),
             dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0.*")]
    for spec in cases:
        ours = apply_lora(copy.deepcopy(base), r=2, **spec)
        ref = get_peft(copy.deepcopy(base), r=2, **spec)
        peft_names = sorted(n for n, m in ref.base_model.model.named_modules() if hasattr(m, "lora_A"))
        assert sorted(lora_layers(ours)) == peft_names, spec
    assert len(lora_layers(apply_lora(copy.deepcopy(base), target_modules=["q_proj"]))) == 2
    # GPT-2's default is c_attn, as PEFT's
    assert sorted(lora_layers(apply_lora(gpt2()))) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_apply_lora_freezes_all_but_adapters_and_reports(capsys):
    model = apply_lora(llama(), target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_rslora=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}.default.weight" for n in lora_layers(model) for w in ("lora_A", "lora_B")}
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.scaling["default"] == 16 / 8 ** 0.5
    report = trainable_parameters(model)
    assert report.trainable == 2 * 8 * (64 + 64) + 2 * 8 * (64 + 32)  # 2 layers of q: 64->64, v: 64->32 (2 kv heads)
    assert report.total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: {report.trainable:,d} || all params: "
                                              f"{report.total:,d}")
    frozen = apply_lora(llama(), target_modules=["q_proj"], inference_mode=True)  # PEFT's inference mode
    assert not any(p.requires_grad for p in frozen.parameters())


def test_merge_lora_restores_plain_layers():
    base = llama()
    x = ids()
    model = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4)
    randomize_B(model)
    expect = reference_logits(base, model, x)
    merged = merge_lora(model)
    assert merged is model and not lora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(model.state_dict()) == set(base.state_dict())
    assert not hasattr(model, "disable_adapter") and not hasattr(model, "llmkit_lora")  # no adapter left
    after = model(x).logits
    assert rel_err(after, expect) < 1e-5
    assert rel_err(after, base(x).logits) > 1e-2


def test_unload_lora_gives_the_base_model_back():
    base = llama()
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4)
    randomize_B(model)
    next(iter(lora_layers(model).values())).merge()  # a merged layer is unmerged first
    unload_lora(model)
    assert not lora_layers(model)
    x = ids()
    assert rel_err(model(x).logits, base(x).logits) < 1e-5


def test_merge_unmerge_round_trip_in_a_model():
    base = gpt2()
    model = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4)
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
        apply_lora(model, target_modules=["q_proj"], r=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        apply_lora(model, target_modules=["q_proj"], lora_alpha=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        apply_lora(model, target_modules=["q_proj"], lora_alpha=-1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_lora(model, target_modules=["q_proj"], lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        apply_lora(model, target_modules=["query", "value"])
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(model, target_modules=r"q_proj")  # a regex must match the whole name
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_lora(model, target_modules=r"(q_proj")
    with pytest.raises(TypeError, match="LlamaMLP"):
        apply_lora(model, target_modules=["mlp"])
    with pytest.raises(TypeError, match="target_modules"):
        apply_lora(model, target_modules=[])
    with pytest.raises(ValueError, match="excludes every module"):
        apply_lora(model, target_modules=["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ValueError, match="no default"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)))  # target_modules None: PEFT has no default for it
    # the old llmkit names and a positional target list say what to write instead
    with pytest.raises(TypeError, match="lora_alpha="):
        apply_lora(model, target_modules=["q_proj"], alpha=16)
    with pytest.raises(TypeError, match="use_rslora="):
        apply_lora(model, target_modules=["q_proj"], rslora=True)
    with pytest.raises(TypeError, match="target_modules="):
        apply_lora(model, ["q_proj"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_rank'"):
        apply_lora(model, target_modules=["q_proj"], lora_rank=4)
    with pytest.raises(TypeError, match="either a config or keyword"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"]), r=4)
    with pytest.raises(ValueError, match="adapter_name"):
        apply_lora(model, target_modules=["q_proj"], adapter_name="a.b")
    assert not lora_layers(model)  # nothing was half-applied
    apply_lora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA.*add_adapter"):
        apply_lora(model, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(llama())


@pytest.mark.parametrize("field, value", [("use_dora", True), ("lora_bias", True), ("bias", "all"),
                                          ("bias", "lora_only"), ("rank_pattern", {"q_proj": 2}),
                                          ("alpha_pattern", {"q_proj": 2}), ("layers_to_transform", [0]),
                                          ("modules_to_save", ["lm_head"]), ("init_lora_weights", "pissa"),
                                          ("trainable_token_indices", [1, 2]), ("use_qalora", True),
                                          ("task_type", "SEQ_CLS"), ("task_type", "TOKEN_CLS")])
def test_unimplemented_peft_features_are_refused_by_name(field, value):
    with pytest.raises(NotImplementedError, match=field if field != "task_type" else value):
        LoraConfig(target_modules=["q_proj"], **{field: value})
    with pytest.raises(NotImplementedError, match=field if field != "task_type" else value):
        apply_lora(llama(), target_modules=["q_proj"], **{field: value})
    try:
        theirs = peft.LoraConfig(target_modules=["q_proj"], **{field: value})
    except (ValueError, TypeError) as exc:  # PEFT refuses some combinations itself
        pytest.skip(f"peft {peft.__version__} refuses {field}={value!r} on its own: {exc}")
    model = llama()
    with pytest.raises(NotImplementedError, match=field if field != "task_type" else value):
        apply_lora(model, theirs)
    assert not lora_layers(model)


def test_config_conversion_from_dicts_and_peft_only_fields():
    config = as_lora_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                             "megatron_core": "megatron.core", "qalora_group_size": 16, "use_bdlora": None,
                             "runtime_config": {"ephemeral_gpu_offload": False}, "peft_version": "0.21.2"})
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, ["q_proj"])
    with pytest.raises(NotImplementedError, match="kasa_config"):
        as_lora_config({"peft_type": "LORA", "kasa_config": {"k": 1}})
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        as_lora_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4})
    with pytest.raises(TypeError, match="LoraConfig"):
        as_lora_config(42)
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig(peft_type="IA3")
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(task_type="CAUSAL")
    with pytest.raises(TypeError, match="r must be an int"):
        LoraConfig(r=2.5)


# ------------------------------------------------------------------ QLoRA --


def test_prepare_qlora_structure_memory_and_outputs():
    base = llama()
    model = prepare_qlora(copy.deepcopy(base), r=8, lora_alpha=16, lora_dropout=0.05)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(find_target_modules(base, "all-linear"))
    assert all(isinstance(layer.base_layer, Linear4bit) and layer.base_layer.double_quant for layer in layers.values())
    assert type(model.lm_head) is nn.Linear  # the output head stays in full precision
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}.default.weight" for n in layers for w in ("lora_A", "lora_B")}
    assert next(iter(layers.values())).lora_dropout["default"] == 0.05

    report = qlora_memory_report(model)
    n = sum(m.weight.numel() for name, m in base.named_modules() if name in layers)
    assert report.quantized_params == n
    assert report.bytes_per_base_param <= 0.53
    # 4 bits + one uint8 absmax per 64 + fp32 nested absmax per 256 blocks + offset, per layer
    expect = sum(w.numel() // 2 + w.numel() // 64 + 4 * -(-w.numel() // (64 * 256)) + 4
                 for w in (m.weight for name, m in base.named_modules() if name in layers))
    assert report.quantized_bytes == expect
    assert report.lora_params == sum(layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel()
                                     for layer in layers.values())
    assert report.total_bytes == report.quantized_bytes + report.lora_bytes + report.other_bytes

    # the 4-bit model is the float64 dense model with dequantized weights plus the same adapters
    randomize_B(model)
    dense = copy.deepcopy(base)
    for name, layer in layers.items():
        dense.get_submodule(name).weight.data = layer.base_layer.dequantize()
    x = ids()
    model.eval()
    assert rel_err(model(x).logits, reference_logits(dense, model, x)) < 1e-5
    assert rel_err(model(x).logits, base(x).logits) > 1e-2


def test_prepare_qlora_takes_a_config_and_paper_defaults():
    model = prepare_qlora(llama())
    layer = next(iter(lora_layers(model).values()))
    assert (layer.r["default"], layer.lora_alpha["default"], layer.lora_dropout["default"]) == (64, 16, 0.05)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = prepare_qlora(llama(), config)
    assert len(lora_layers(model)) == 4
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(model).values())
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear  # not targeted: not quantized


def test_prepare_qlora_gpt2_trains_with_gradient_checkpointing():
    model = prepare_qlora(gpt2(), r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=True,
                          compute_dtype=torch.float32)
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
        ga, gb = a.lora_A["default"].weight.grad, b.lora_A["default"].weight.grad
        assert ga is not None and ga.abs().sum() > 0, name
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.lora_B["default"].weight.grad, b.lora_B["default"].weight.grad,
                                   rtol=1e-5, atol=1e-7)


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
    with pytest.raises(TypeError, match="lora_alpha="):
        prepare_qlora(llama(), alpha=16)
    with pytest.raises(TypeError, match="lora_dropout="):
        prepare_qlora(llama(), dropout=0.1)
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        prepare_qlora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), target_modules=["0"],
                      gradient_checkpointing=True)
    with pytest.raises(ValueError, match="already has LoRA"):
        prepare_qlora(apply_lora(llama(), target_modules=["q_proj"]))
    model = llama()
    with pytest.raises(NotImplementedError, match="use_dora"):
        prepare_qlora(model, use_dora=True)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())  # refused before quantizing


def test_a_layer_lora_cannot_wrap_leaves_the_model_as_it_was():
    bnb = pytest.importorskip("bitsandbytes")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a_proj = nn.Linear(64, 64)
            self.b_proj = bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")  # packed uint8 weight

    model = Two()
    with pytest.raises(TypeError, match="bitsandbytes.*llmkit.nn.Linear4bit"):
        apply_lora(model, target_modules=["a_proj", "b_proj"])
    assert type(model.a_proj) is nn.Linear and model.a_proj.weight.requires_grad  # untouched
    assert not hasattr(model, "llmkit_lora")
