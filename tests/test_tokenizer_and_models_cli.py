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
    assert tok.vocab_size == len(tok) == tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    for text in ["the cat sat", "dogs and cats on mats!", "unseen ü"]:
        ids = tok.encode(text)
        assert ids == reference(text)["input_ids"]
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.encode("the cat", add_special_tokens=False) == reference("the cat", add_special_tokens=False)["input_ids"]
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
    assert main(["generate", str(tmp_path / "nothing"), "x"]) == 2
    assert "config.json" in capsys.readouterr().err


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
