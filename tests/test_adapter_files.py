"""PEFT adapter directories both ways: save_adapter / load_adapter against PeftModel, named adapters, atomicity.

What we write loads in PEFT and what PEFT writes loads here, with the same
logits (each checked against the float64 reference first); named adapters
use PEFT's layout (``"default"`` at the root, others in ``<dir>/<name>/``),
compared file for file with PEFT's ``save_pretrained``. A save is atomic as a
whole: an exception or a ``kill -9`` at any moment leaves the previous
adapter or the new one, never new weights with an old config. Loading checks
config, weights and model against each other and names what differs.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import llmkit.utils.atomic
from llmkit.adapt import (LoraConfig, apply_lora, load_adapter, lora_layers, merge_lora, prepare_qlora,
                          save_adapter)
from lora_reference import (against_reference_and_peer, copy_adapters_to_peft, get_peft, gpt2, ids, llama,
                            randomize_B, reference_logits, rel_err)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")


def listing(directory):
    """Relative paths of the files under `directory`, PEFT's model card left out."""
    out = []
    for root, _, files in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, f), directory) for f in files if f != "README.md"]
    return sorted(out)


def peft_from_pretrained(base, directory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(directory), **kwargs)


@pytest.mark.parametrize("make", [llama, gpt2])
def test_save_adapter_loads_in_peft(make, tmp_path):
    base = make()
    ours = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4, lora_alpha=16, lora_dropout=0.1)
    randomize_B(ours)
    save_adapter(ours, tmp_path)
    assert listing(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["fan_in_fan_out"] == (make is gpt2) and config["inference_mode"] is True
    tensors = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    name = next(iter(lora_layers(ours)))
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"],
                       lora_layers(ours)[name].lora_B["default"].weight)

    ref = peft_from_pretrained(copy.deepcopy(base), tmp_path)
    assert ref.peft_config["default"].lora_dropout == 0.1
    x = ids()
    ours.eval(), ref.eval()
    against_reference_and_peer(ours(x).logits, ref(x).logits, reference_logits(base, ours, x), 1e-5,
                               f"{make.__name__} adapter saved by llmkit, loaded by PEFT")
    assert rel_err(ours(x).logits, base(x).logits) > 1e-2


@pytest.mark.parametrize("make", [llama, gpt2])
def test_load_adapter_reads_peft_save_pretrained(make, tmp_path):
    base = make()
    targets = ["q_proj", "o_proj"] if make is llama else ["c_attn", "c_fc"]
    ref = get_peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ref.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)  # applies LoRA from the config
    assert len(lora_layers(ours)) == len([m for m in ref.modules() if hasattr(m, "lora_A")])
    tensors = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in lora_layers(ours).items():  # the file's tensors, exactly
        assert torch.equal(layer.lora_A["default"].weight, tensors[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B["default"].weight, tensors[f"base_model.model.{name}.lora_B.weight"])
    assert not any(p.requires_grad for p in ours.parameters())  # PEFT's is_trainable=False: frozen
    x = ids()
    ref.eval()
    against_reference_and_peer(ours(x).logits, ref(x).logits, reference_logits(base, ours, x), 1e-5,
                               f"{make.__name__} adapter saved by PEFT, loaded by llmkit")
    assert rel_err(ours(x).logits, base(x).logits) > 1e-2
    # into an existing adapter of the same shape: new weights, same result; trainable when asked
    again = apply_lora(copy.deepcopy(base), target_modules=targets, r=4, lora_alpha=8)
    assert rel_err(again(x).logits, base(x).logits) < 1e-6
    load_adapter(again, tmp_path, is_trainable=True)
    assert rel_err(again(x).logits, ours(x).logits) < 1e-6
    assert all(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)


def test_adapter_round_trip_ours_to_ours(tmp_path):
    base = llama()
    a = apply_lora(copy.deepcopy(base), target_modules=r".*\.(q|v|down)_proj", r=4, use_rslora=True)
    randomize_B(a)
    save_adapter(a, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*\.(q|v|down)_proj" and config["use_rslora"]
    b = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(lora_layers(b)) == sorted(lora_layers(a))
    for name, layer in lora_layers(b).items():
        assert torch.equal(layer.lora_B["default"].weight, lora_layers(a)[name].lora_B["default"].weight)
        assert layer.scaling == lora_layers(a)[name].scaling


def test_named_adapters_saved_in_peft_s_layout_both_ways(tmp_path):
    base = llama()
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4)
    ours.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_B(ours)
    save_adapter(ours, tmp_path / "ours")
    ref = get_peft(copy.deepcopy(base), r=4, target_modules=["q_proj"])
    ref.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    for name in ("default", "other"):
        copy_adapters_to_peft(ours, ref, name)
    ref.save_pretrained(tmp_path / "peft")
    assert listing(tmp_path / "ours") == listing(tmp_path / "peft") == [
        "adapter_config.json", "adapter_model.safetensors", "other/adapter_config.json",
        "other/adapter_model.safetensors"]
    for rel in listing(tmp_path / "ours"):
        if rel.endswith(".safetensors"):
            a, b = (safetensors_torch.load_file(tmp_path / d / rel) for d in ("ours", "peft"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel

    x = ids()
    # PEFT reads ours: the root as "default", the sub-directory by name
    theirs = peft_from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    # we read PEFT's the same way
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    load_adapter(mine, tmp_path / "peft" / "other", adapter_name="other")
    assert mine.active_adapter == "default"  # a loaded second adapter does not switch, as PEFT's load_adapter
    for name in ("default", "other"):
        theirs.set_adapter(name)
        mine.set_adapter(name)
        ours.set_adapter(name)
        against_reference_and_peer(mine(x).logits, theirs(x).logits, reference_logits(base, ours, x, name), 1e-5,
                                   f"named adapter {name!r} across llmkit and PEFT files")
        assert rel_err(ours(x).logits, mine(x).logits) < 1e-6

    save_adapter(ours, tmp_path / "only", selected_adapters=["other"])
    assert listing(tmp_path / "only") == ["other/adapter_config.json", "other/adapter_model.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"sub-directories \['other'\]"):
        load_adapter(copy.deepcopy(base), tmp_path / "only")
    with pytest.raises(ValueError, match="selected_adapters"):
        save_adapter(ours, tmp_path / "x", selected_adapters=["missing"])
    with pytest.raises(TypeError, match="selected_adapters"):
        save_adapter(ours, tmp_path / "x", selected_adapters="other")


def test_qlora_adapter_round_trips_through_files(tmp_path):
    base = llama()
    model = prepare_qlora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_B(model)
    save_adapter(model, tmp_path)
    reloaded = load_adapter(prepare_qlora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                            tmp_path)
    x = ids()
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="rounding"):
        merge_lora(model)


def test_save_is_whole_or_nothing_and_keeps_other_files(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    model = apply_lora(llama(), target_modules=["q_proj"], r=2)
    randomize_B(model)
    save_adapter(model, target)
    (target / "README.md").write_text("the user's notes")
    (target / "adapter_model.bin").write_bytes(b"stale legacy weights")
    files = {p: (target / p).read_bytes() for p in os.listdir(target)}
    other = apply_lora(llama(seed=5), target_modules=["q_proj", "v_proj"], r=4)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt("interrupted after the new files were written, before the swap")

    monkeypatch.setattr(llmkit.utils.atomic, "_fsync_tree", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(other, target)
    monkeypatch.undo()
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == files  # untouched
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary directory left
    save_adapter(other, target)  # a save that completes replaces both files
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 4
    assert (target / "README.md").read_text() == "the user's notes"  # kept
    assert not (target / "adapter_model.bin").exists()  # stale weights of another save: dropped
    load_adapter(llama(seed=5), target)


SAVER = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from llmkit.adapt import apply_lora, lora_layers, save_adapter

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(512, 512), nn.Linear(512, 256)

    # Two adapters of different ranks and targets, saved in turn; every tensor of save i holds i,
    # and the config names i: a mix of two saves cannot pass for one.
    models = [apply_lora(Tiny(), target_modules=["q_proj"], r=8),
              apply_lora(Tiny(), target_modules=["q_proj", "v_proj"], r=32)]
    i = 0
    while True:
        i += 1
        model = models[i % 2]
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_A["default"].weight.fill_(i)
                layer.lora_B["default"].weight.fill_(i)
        save_adapter(model, sys.argv[1], base_model_name_or_path=f"save-{i}")
        if i == 3:
            print("go", flush=True)
""")


def test_kill_9_during_saves_never_mixes_weights_and_config(tmp_path):
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(512, 512), nn.Linear(512, 256)

    target = tmp_path / "adapter"
    for delay in (0.03, 0.17):  # each run pays a Python + torch start; two moments suffice per run
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = load_adapter(Tiny(), target)  # recovers a directory a fallback rename left aside
        i = int(json.loads((target / "adapter_config.json").read_text())["base_model_name_or_path"].split("-")[1])
        layers = lora_layers(model)
        assert sorted(layers) == (["q_proj"] if i % 2 == 0 else ["q_proj", "v_proj"])
        for layer in layers.values():
            assert layer.r["default"] == (8 if i % 2 == 0 else 32)
            assert (layer.lora_A["default"].weight == i).all() and (layer.lora_B["default"].weight == i).all()


def test_load_adapter_checks_config_weights_and_model(tmp_path):
    base = llama()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        load_adapter(copy.deepcopy(base), tmp_path / "empty")
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4)
    save_adapter(model, tmp_path)
    config_path, weights_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    tensors = safetensors_torch.load_file(weights_path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def fresh():
        return copy.deepcopy(base)

    # a config whose rank is not the weights'
    config_path.write_text(json.dumps(dict(config, r=8)))
    with pytest.raises(ValueError, match="config says r=8 but the tensor has rank 4"):
        load_adapter(fresh(), tmp_path)
    # a config whose targets are not the weights'
    config_path.write_text(json.dumps(dict(config, target_modules=["v_proj"])))
    with pytest.raises(ValueError, match="q_proj.*do not select.*different saves"):
        load_adapter(fresh(), tmp_path)
    config_path.write_text(json.dumps(dict(config, target_modules=["q_proj", "v_proj"])))
    with pytest.raises(ValueError, match="no base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"):
        load_adapter(fresh(), tmp_path)
    config_path.write_text(json.dumps(config))

    # a tensor of the wrong shape: the message names the key and both shapes
    safetensors_torch.save_file(dict(tensors, **{key: torch.zeros(32, 4)}), weights_path)
    with pytest.raises(ValueError, match=r"q_proj\.lora_B\.weight.*\(32, 4\).*\(64, 4\)"):
        load_adapter(fresh(), tmp_path)
    # a tensor for a module the model does not have
    safetensors_torch.save_file(dict(tensors, **{
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}), weights_path)
    with pytest.raises(ValueError, match="layers.7"):
        load_adapter(fresh(), tmp_path)
    # not a LoRA tensor at all
    safetensors_torch.save_file(dict(tensors, **{"base_model.model.lm_head.weight": torch.zeros(2)}), weights_path)
    with pytest.raises(ValueError, match="not a LoRA A/B weight"):
        load_adapter(fresh(), tmp_path)
    # a model the adapter is not for (other widths): shapes named
    other = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64))
    safetensors_torch.save_file(tensors, weights_path)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(4, 64\), expected \(4, 32\).*32 -> 32"):
        load_adapter(other, tmp_path)
    # the rank of an existing adapter of that name
    with pytest.raises(ValueError, match="r=2"):
        load_adapter(apply_lora(fresh(), target_modules=["q_proj"], r=2), tmp_path)
    # a model that failed a load is untouched
    model = fresh()
    config_path.write_text(json.dumps(dict(config, r=8)))
    with pytest.raises(ValueError):
        load_adapter(model, tmp_path)
    assert not lora_layers(model) and not hasattr(model, "llmkit_lora")
    config_path.write_text(json.dumps(config))

    weights_path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(fresh(), tmp_path)
    os.remove(weights_path)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(fresh(), tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(fresh(), tmp_path)
    config_path.write_text(json.dumps(dict(config, peft_type="PROMPT_TUNING")))
    with pytest.raises(ValueError, match="PROMPT_TUNING.*load_prompt"):
        load_adapter(fresh(), tmp_path)
    config_path.write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(NotImplementedError, match="use_dora"):
        load_adapter(fresh(), tmp_path)
    with pytest.raises(ValueError, match="adapter_name"):
        load_adapter(fresh(), tmp_path, adapter_name="../x")
