"""`llmkit adapter info|merge` on a PEFT adapter for a GPT-2 saved from a config."""

import json

import pytest
import torch

from llmkit import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture()
def model_and_adapter(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=101)
    base = transformers.GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "model")
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # PEFT initialises B to zero: make the adapter matter
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path, peft_model


def test_merge_matches_peft_merge_and_unload(model_and_adapter, capsys):
    tmp, peft_model = model_and_adapter
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        expected = peft_model.merge_and_unload()(ids).logits
    code = cli.main(["adapter", "merge", "--model", str(tmp / "model"), "--adapter", str(tmp / "adapter"),
                     "--out", str(tmp / "merged")])
    assert code == 0 and "GPT2LMHeadModel" in capsys.readouterr().out
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp / "merged").eval()
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp / "model").eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the adapter changed the model


def test_info(model_and_adapter, capsys):
    tmp, _ = model_and_adapter
    assert cli.main(["adapter", "info", str(tmp / "adapter")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["peft_type"] == "LORA" and info["config"]["r"] == 4
    # 2 layers x (c_attn: A 4x32 + B 96x4, c_fc: A 4x32 + B 128x4)
    assert info["parameters"] == 2 * (4 * 32 + 96 * 4 + 4 * 32 + 128 * 4)


def test_bad_directories(tmp_path, capsys):
    assert cli.main(["adapter", "info", str(tmp_path)]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert cli.main(["adapter", "merge", "--model", str(tmp_path), "--adapter", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
