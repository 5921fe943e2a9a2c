"""llmkit.data.tokenizer.Tokenizer (tokenizer.json + special tokens), the
`llmkit models` / `llmkit generate` commands and `llmkit bench models --quick`."""

import json

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from llmkit.bench import harness, make_options, registered  # noqa: E402
from llmkit.cli import main  # noqa: E402
from llmkit.data.tokenizer import Tokenizer  # noqa: E402
from llmkit.models import GPT  # noqa: E402

TEXT = ["the cat sat on the mat", "a dog ate the bone", "the cat and the dog", "on the mat sat a cat"] * 20


def bpe_tokenizer_dir(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXT, trainer)
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>",
         "unk_token": "<unk>", "padding_side": "left"}))
    return tmp_path


def test_tokenizer_json_with_special_tokens_matches_transformers(tmp_path):
    directory = bpe_tokenizer_dir(tmp_path)
    tok = Tokenizer.from_file(directory)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 3)
    assert tok.mask_token is None and tok.mask_token_id is None
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tok.vocab_size == len(tok) == backend.get_vocab_size()
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    for text in ["the cat sat", "dogs and cats on mats!", "unseen ü"]:
        ids = tok.encode(text)
        assert ids == reference(text)["input_ids"]
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    plain = reference("the cat", add_special_tokens=False)["input_ids"]
    assert tok.encode("the cat", add_special_tokens=False) == plain
    batch = tok(["the cat", "the cat sat on the mat"])
    assert tok.padding_side == "left"  # from tokenizer_config.json
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][0, 0] == 0 and batch["attention_mask"][1].all()
    right = tok(["the cat", "the cat sat on the mat"], padding_side="right")
    assert right["attention_mask"][0, -1] == 0
    # save -> load keeps the vocabulary and the special tokens.
    again = Tokenizer.from_file(tok.save(tmp_path / "saved"))
    assert again.special_tokens == tok.special_tokens and again.encode("a dog") == tok.encode("a dog")
    # Keyword arguments override the files.
    assert Tokenizer.from_file(directory / "tokenizer.json", pad_token="</s>").pad_token_id == 2


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    directory = bpe_tokenizer_dir(tmp_path / "ok")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer.from_file(directory, mask_token="<mask>")
    tok = Tokenizer.from_file(directory / "tokenizer.json")
    tok.special_tokens.pop("pad_token")
    with pytest.raises(ValueError, match="no pad_token"):
        tok(["a", "the cat sat"])
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match="no texts"):
        tok([])


def test_models_list_and_info_and_generate_commands(tmp_path, capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "gpt2" in listing and "124.44M" in listing and "bert-base" in listing
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    bpe_tokenizer_dir(model_dir)
    model = GPT.from_preset("gpt-tiny", vocab_size=Tokenizer.from_file(model_dir).vocab_size)
    model.to_hf(model_dir)
    assert main(["models", "info", str(model_dir)]) == 0
    assert "GPT from" in capsys.readouterr().out
    assert main(["generate", str(model_dir), "the cat", "--max-new-tokens", "5", "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert "(5 tokens in" in out.err
    import llmkit  # the printed text is the greedy continuation
    tok = Tokenizer.from_file(model_dir)
    greedy = llmkit.generate(model, "the cat", tokenizer=tok, max_new_tokens=5, eos_token_id=[])
    assert len(greedy.sequences[0]) == 5 and out.out.strip() == greedy.texts[0].strip()
    assert main(["generate", str(model_dir), "1 5 9", "--ids", "--max-new-tokens", "3", "--ignore-eos"]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    # Several prompts: one line each, "[i] ...", printed when the sequence ends.
    assert main(["generate", str(model_dir), "1 5 9", "7", "--ids", "--max-new-tokens", "3", "--ignore-eos"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = llmkit.generate(model, [[1, 5, 9], [7]], max_new_tokens=3, eos_token_id=[]).sequences
    assert sorted(lines) == [f"[{i}] " + " ".join(map(str, seq)) for i, seq in enumerate(expected)]
    assert main(["generate", str(tmp_path / "nothing"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def one_line_error(argv, capsys, command):
    """Run the `llmkit` command; it must fail with exit 2 and one line `llmkit COMMAND: error: ...`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llmkit {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_models_info_and_generate_give_one_line_errors(tmp_path, capsys):
    torch.manual_seed(0)
    good = tmp_path / "good"
    bpe_tokenizer_dir(good)
    model = GPT.from_preset("gpt-tiny", vocab_size=Tokenizer.from_file(good).vocab_size)
    model.save_pretrained(good)
    assert "does not exist" in one_line_error(["models", "info", str(tmp_path / "missing")], capsys, "models")
    assert "is not a directory" in one_line_error(["models", "info", str(good / "config.json")], capsys, "models")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in one_line_error(["models", "info", str(empty)], capsys, "models")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "not a valid config.json" in one_line_error(["models", "info", str(broken)], capsys, "models")
    (broken / "config.json").write_text('{"model_type": "mamba"}')
    assert "no llmkit model for model_type 'mamba'" in one_line_error(["models", "info", str(broken)], capsys,
                                                                       "models")
    (broken / "config.json").write_text('{"vocab_size": 3}')
    assert "has no model_type" in one_line_error(["models", "info", str(broken)], capsys, "models")
    # A config with fewer layers than the weights: refused, not loaded truncated.
    fewer = tmp_path / "fewer"
    model.save_pretrained(fewer)
    config = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    err = one_line_error(["models", "info", str(fewer)], capsys, "models")
    assert "not used by the model: transformer.h.{1}.*" in err
    weights = (good / "model.safetensors").read_bytes()
    (fewer / "config.json").write_text(json.dumps(config))
    (fewer / "model.safetensors").write_bytes(weights[:1000])
    assert "not a valid safetensors file" in one_line_error(["models", "info", str(fewer)], capsys, "models")
    assert main(["models", "info", str(good)]) == 0
    assert "GPT from" in capsys.readouterr().out

    bert = tmp_path / "bert"
    from llmkit.models import BERT
    BERT.from_preset("bert-tiny").save_pretrained(bert)
    assert "decoder-only" in one_line_error(["generate", str(bert), "x"], capsys, "generate")
    no_tok = tmp_path / "no_tok"
    model.save_pretrained(no_tok)
    assert "no tokenizer.json" in one_line_error(["generate", str(no_tok), "the cat"], capsys, "generate")
    assert "not space-separated integer token ids" in one_line_error(
        ["generate", str(good), "1 x 3", "--ids"], capsys, "generate")
    assert "outside the vocabulary" in one_line_error(["generate", str(good), "1 99999", "--ids"], capsys,
                                                      "generate")
    assert "max_new_tokens must be >= 0" in one_line_error(
        ["generate", str(good), "the cat", "--max-new-tokens", "-3"], capsys, "generate")
    assert "top_k must be >= 0" in one_line_error(["generate", str(good), "the", "--top-k", "-1"], capsys,
                                                  "generate")
    # Values argparse refuses (nan, an unknown device) end with its usage line + one error line, exit 2.
    for flags in (["--repetition-penalty", "nan"], ["--temperature", "inf"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", str(good), "the cat"] + flags)
        assert exit_info.value.code == 2
        assert "error: argument" in capsys.readouterr().err
    assert main(["generate", str(good), "the cat", "--device", "cpu", "--dtype", "bfloat16",
                 "--max-new-tokens", "2", "--ignore-eos"]) == 0
    assert "(2 tokens in" in capsys.readouterr().err


def test_models_info_on_a_bad_directory_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "llmkit", "models", "info", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"llmkit models: error: {tmp_path} has no config.json (expected a Hugging " \
                                    "Face checkpoint directory)"


def test_models_bench_quick_runs_both_contenders_on_the_same_weights():
    opts = make_options(quick=True, device="cpu")
    opts.progress = False
    opts.budget_s, opts.warmup_s, opts.repeats, opts.min_repeats = 0.2, 0.0, 3, 3
    cases = registered()["models"].cases(opts)
    assert [c.params["kind"] for c in cases] == ["train", "generate"]
    train = {m.contender: m for m in harness.run_case(cases[0], opts).measurements}
    assert all(m.ok for m in train.values()) and train["transformers-sdpa"].speedup is not None
    assert "DIFFERS" not in train["llmkit"].note and train["llmkit"].note.startswith("loss ")
    assert "DIFFERS" not in train["llmkit, full logits + F.cross_entropy"].note
    generate = {m.contender: m for m in harness.run_case(cases[1], opts).measurements}
    assert generate["llmkit"].note.startswith("1/1 sequences token-for-token equal")
