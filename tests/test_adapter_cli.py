"""`llmkit adapter info|merge` on PEFT adapters for a GPT-2 saved from a config.

The merged model's logits are checked against the float64 reference (the base
with the adapter folded in, in float64) and against PEFT's
``merge_and_unload`` where PEFT agrees with that reference. User mistakes
raise FileNotFoundError / ValueError with a message naming the problem (the
``llmkit`` command turns them into one line and exit status 2); the handler
is called directly here so the exception itself is checked.
"""

import json

import pytest
import torch

from llmkit import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")


def handle(argv):
    """Parse `argv` as the `llmkit` command does and run the handler (exceptions propagate)."""
    args = cli.build_parser().parse_args(argv)
    return args.handler(args)


def tiny_gpt2(seed=0, n_embd=32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=n_embd, n_positions=64, vocab_size=101)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture()
def model_and_adapter(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "model")
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # PEFT initialises B to zero: make the adapter matter
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path, peft_model


def reference_merged_logits(model_dir, adapter_dir, ids):
    """Float64: the base model with scaling * (B @ A).T added to each Conv1D weight (GPT-2's layout)."""
    ref = transformers.GPT2LMHeadModel.from_pretrained(model_dir).double().eval()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = safetensors_torch.load_file(adapter_dir / "adapter_model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, A in tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                B = tensors[key.replace("lora_A", "lora_B")]
                ref.get_submodule(name).weight.add_((scaling * B.double() @ A.double()).T)
        return ref(ids).logits


@pytest.mark.parametrize("out_flag", ["-o", "--output", "--out"])
def test_merge_matches_reference_and_peft_merge_and_unload(model_and_adapter, capsys, out_flag):
    tmp, peft_model = model_and_adapter
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        theirs = peft_model.merge_and_unload()(ids).logits
    (tmp / "merged").mkdir()
    (tmp / "merged" / "notes.txt").write_text("kept")
    code = handle(["adapter", "merge", "--model", str(tmp / "model"), "--adapter", str(tmp / "adapter"),
                   out_flag, str(tmp / "merged"), "--device", "cpu"])
    assert code == 0 and "GPT2LMHeadModel" in capsys.readouterr().out
    assert (tmp / "merged" / "notes.txt").read_text() == "kept"  # the user's other files survive the save
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp / "merged").eval()
    with torch.no_grad():
        got = merged(ids).logits
    want = reference_merged_logits(tmp / "model", tmp / "adapter", ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if not torch.allclose(theirs.double(), want, rtol=1e-5, atol=1e-5):
        pytest.skip(f"peer wrong on this machine (llmkit's result matched the reference): peft {peft.__version__}, "
                    f"CPU capability {torch.backends.cpu.get_cpu_capability()}: GPT-2 merge_and_unload logits")
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp / "model").eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, got, atol=1e-3)  # the adapter changed the model


def test_info(model_and_adapter, capsys):
    tmp, peft_model = model_and_adapter
    assert handle(["adapter", "info", str(tmp / "adapter")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["peft_type"] == "LORA" and info["config"]["r"] == 4
    # 2 layers x (c_attn: A 4x32 + B 96x4, c_fc: A 4x32 + B 128x4)
    assert info["parameters"] == 2 * (4 * 32 + 96 * 4 + 4 * 32 + 128 * 4)
    assert "named_adapters" not in info
    peft_model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["c_proj"]))
    peft_model.save_pretrained(tmp / "two")
    assert handle(["adapter", "info", str(tmp / "two")]) == 0
    assert json.loads(capsys.readouterr().out)["named_adapters"] == ["second"]


def test_user_mistakes_raise_clear_errors(model_and_adapter, tmp_path_factory):
    tmp, _ = model_and_adapter
    empty = tmp_path_factory.mktemp("empty")
    model, adapter = str(tmp / "model"), str(tmp / "adapter")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        handle(["adapter", "info", str(empty / "missing")])
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        handle(["adapter", "info", str(empty)])
    with pytest.raises(NotADirectoryError, match="is a file"):
        handle(["adapter", "info", str(tmp / "adapter" / "adapter_config.json")])
    (empty / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        handle(["adapter", "info", str(empty)])

    def merge(model_dir, adapter_dir, out):
        return handle(["adapter", "merge", "--model", model_dir, "--adapter", adapter_dir, "-o", out])

    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        merge(str(tmp / "nowhere"), adapter, str(tmp / "o"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        merge(adapter, adapter, str(tmp / "o"))  # an adapter directory given as the model
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        merge(model, model, str(tmp / "o"))  # a model directory given as the adapter
    with pytest.raises(ValueError, match="is the model or adapter directory"):
        merge(model, adapter, model)
    # an adapter for another model: the shapes say so, before anything is written
    other = tiny_gpt2(n_embd=48)
    other.save_pretrained(tmp / "other")
    with pytest.raises(ValueError, match=r"shape mismatch.*expected"):
        merge(str(tmp / "other"), adapter, str(tmp / "o"))
    assert not (tmp / "o").exists()
    # a prompt-tuning adapter is not a LoRA one
    prompt = peft.get_peft_model(tiny_gpt2(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    prompt.save_pretrained(tmp / "prompt")
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        merge(model, str(tmp / "prompt"), str(tmp / "o"))
    with pytest.raises(SystemExit):  # argparse's own usage error (exit status 2)
        handle(["adapter", "merge", "--model", model, "--adapter", adapter, "-o", str(tmp / "o"), "--device", "tpu"])


def test_the_command_prints_one_line_and_exits_2(tmp_path, capsys):
    """Through `llmkit`'s main: the user's mistake is one line on stderr, no traceback."""
    assert cli.main(["adapter", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"llmkit adapter: error: adapter directory '{tmp_path / 'missing'}' "
                                        "does not exist"]
