"""Checkpoint directories of every family: from_pretrained / save_pretrained.

The contract (llmkit/models/hf_io.py), checked on tiny random models built
from transformers configs (nothing is downloaded):

- one signature on GPT, BERT / RoBERTa, T5 and Longformer; from_hf / to_hf are
  the same methods; loaded models are in eval mode; dtype= (torch dtypes,
  "float32" / "bfloat16" / "auto") and device= on every family;
- keys are checked both ways against a transformers-saved checkpoint: a config
  with fewer or more layers than the weights is an error that lists them, the
  keys transformers ignores too (GPT-2's attn.bias buffers, RoPE inv_freq,
  tied copies, other heads) are not;
- a shard index naming a file outside its directory is refused; truncated or
  corrupt files give a ValueError naming the file; .bin files load with
  weights_only=True (a pickle that would run code is refused, and runs nothing);
- save_pretrained writes weights + config + tokenizer as one atomic unit,
  keeps the user's other files, drops the previous save's weight shards, and
  gives files the umask's modes; sharded and .bin saves load in transformers.
"""

import json
import logging
import os
import stat

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llmkit.data.tokenizer import Tokenizer  # noqa: E402
from llmkit.models import GPT, T5, BertForMaskedLM, Longformer, LongformerForMaskedLM  # noqa: E402
from llmkit.models.bert import BERT, BertForPreTraining  # noqa: E402
from llmkit.models.hf_io import load_hf_checkpoint, summarize_keys  # noqa: E402

import test_models_bert as bert_tests  # noqa: E402
import test_models_gpt as gpt_tests  # noqa: E402
import test_models_longformer as longformer_tests  # noqa: E402
import test_models_t5 as t5_tests  # noqa: E402

# family name -> (transformers model factory, llmkit class, config key of the layer count, inputs)
FAMILIES = {
    "gpt2": (lambda: gpt_tests.hf_model("gpt2"), GPT, "n_layer"),
    "llama": (lambda: gpt_tests.hf_model("llama"), GPT, "num_hidden_layers"),
    "bert-mlm": (lambda: bert_tests.hf_model("bert", BertForMaskedLM), BertForMaskedLM, "num_hidden_layers"),
    "roberta": (lambda: bert_tests.hf_model("roberta", BERT), BERT, "num_hidden_layers"),
    "t5": (lambda: t5_tests.hf_model(decoder_layers=2), T5, "num_layers"),
    "longformer-mlm": (lambda: longformer_tests.hf_model(LongformerForMaskedLM), LongformerForMaskedLM,
                       "num_hidden_layers"),
}


def outputs(name, model, hf=False):
    """The family's main output on fixed random ids (never zeros)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (2, 11), generator=g)
    with torch.no_grad():
        if name == "t5":
            labels = torch.randint(3, 90, (2, 5), generator=g)
            return model(input_ids=ids, labels=labels).logits
        out = model(input_ids=ids) if hf else model(ids)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def saved(name, tmp_path):
    hf = FAMILIES[name][0]()
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_checkpoint_loads_in_eval_mode_with_its_outputs(name, tmp_path):
    hf, directory = saved(name, tmp_path)
    cls = FAMILIES[name][1]
    model = cls.from_pretrained(directory)
    assert not model.training and not any(m.training for m in model.modules())
    assert cls.from_hf.__func__ is cls.from_pretrained.__func__ and cls.to_hf is cls.save_pretrained
    ours, theirs = outputs(name, model), outputs(name, hf.eval(), hf=True)
    assert torch.isfinite(theirs).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    # The same signature everywhere: dtype (name, torch dtype, "auto") and device.
    half = cls.from_pretrained(directory, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and not half.training
    assert {p.dtype for p in cls.from_pretrained(hf, dtype=torch.float16).parameters()} == {torch.float16}
    assert {p.dtype for p in cls.from_pretrained(directory, dtype="auto").parameters()} == {torch.float32}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_with_fewer_or_more_layers_than_the_weights_is_an_error(name, tmp_path):
    _, directory = saved(name, tmp_path)
    cls, key = FAMILIES[name][1], FAMILIES[name][2]
    config = json.loads((directory / "config.json").read_text())
    layers = config[key]
    assert layers == 2
    changes = {key: 1}
    if name == "longformer-mlm":
        changes["attention_window"] = config["attention_window"][:1]
    if name == "t5":
        changes["num_decoder_layers"] = 1
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=r"not used by the model: .*\{1\}\.\*") as info:
        cls.from_pretrained(directory)
    assert "does not match its config" in str(info.value)
    changes = {k: (3 if k in (key, "num_decoder_layers") else v) for k, v in changes.items()}
    if name == "longformer-mlm":
        changes["attention_window"] = config["attention_window"] + [4]
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: .*\{2\}\.\*"):
        cls.from_pretrained(directory)


def test_benign_keys_are_ignored_and_unknown_ones_are_not(tmp_path):
    from safetensors.torch import load_file, save_file

    _, directory = saved("gpt2", tmp_path)
    state = load_file(directory / "model.safetensors")
    # What transformers < 4.3x saved for GPT-2 (mask buffers) and a tied copy of the head.
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 96, 96))
    state["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, directory / "model.safetensors")
    GPT.from_pretrained(directory)
    state["transformer.h.1.attn.extra.weight"] = torch.randn(3)  # in the body, unknown: refused
    save_file(state, directory / "model.safetensors")
    with pytest.raises(ValueError, match="1 checkpoint weights are not used by the model: "
                                         "transformer.h.1.attn.extra.weight"):
        GPT.from_pretrained(directory)
    # A Llama checkpoint carrying RoPE's inverse frequencies (older transformers).
    _, llama_dir = saved("llama", tmp_path / "llama")
    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(state, llama_dir / "model.safetensors")
    GPT.from_pretrained(llama_dir)
    del state["lm_head.weight"]  # untied: the head is needed
    save_file(state, llama_dir / "model.safetensors")
    with pytest.raises(ValueError, match="missing from the checkpoint: lm_head.weight"):
        GPT.from_pretrained(llama_dir)


def test_other_heads_are_logged_and_new_heads_warned(tmp_path, caplog):
    pre = bert_tests.hf_model("bert", BertForPreTraining)
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        encoder = BERT.from_pretrained(pre)
    assert "another architecture's head: cls." in caplog.text
    assert torch.equal(encoder.pooler.weight, pre.bert.pooler.dense.weight)
    with pytest.warns(UserWarning, match="newly initialised"):
        BertForMaskedLM.from_pretrained(bert_tests.hf_model("bert", BERT))


def test_config_overrides_and_bad_arguments(tmp_path):
    _, directory = saved("gpt2", tmp_path)
    model = GPT.from_pretrained(directory, dropout=0.25)
    assert model.config.dropout == 0.25
    with pytest.raises(TypeError, match="unknown config field.*'no_such_field'"):
        GPT.from_pretrained(directory, no_such_field=1)
    for bad in ("int8", "fp99", torch.int32):
        with pytest.raises(ValueError, match="floating"):
            GPT.from_pretrained(directory, dtype=bad)
    with pytest.raises(TypeError, match="dtype must be"):
        GPT.from_pretrained(directory, dtype=3)
    with pytest.raises(ValueError, match="device must be a torch device"):
        GPT.from_pretrained(directory, device="gpu0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nothing")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        GPT.from_pretrained(directory / "config.json")
    with pytest.raises(TypeError, match="transformers model object or a local checkpoint directory"):
        GPT.from_pretrained(42)


def test_auto_dtype_follows_the_checkpoint_and_rope_stays_float32(tmp_path):
    hf = gpt_tests.hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = GPT.from_pretrained(tmp_path)  # dtype=None is "auto", transformers 5's default
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.inv_freq.dtype == torch.float32  # a derived constant, float32 as in transformers
    assert GPT.from_pretrained(hf).transformer.wte.weight.dtype == torch.bfloat16
    assert GPT.from_pretrained(tmp_path, dtype="float32").transformer.wte.weight.dtype == torch.float32
    ours = outputs("llama", model).float()
    theirs = outputs("llama", hf, hf=True).float()
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()


# ------------------------------------------------------------------------------------- damaged files

def test_truncated_or_corrupt_files_name_the_file(tmp_path):
    _, directory = saved("gpt2", tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        GPT.from_pretrained(directory)
    weights.write_bytes(data)
    (directory / "config.json").write_text('{"model_type": "gpt2", ')
    with pytest.raises(ValueError, match="config.json is not a valid config.json"):
        GPT.from_pretrained(directory)
    (directory / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        GPT.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GPT.from_pretrained(directory)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what a malicious pickle would do: touch the file system


def test_bin_weights_load_with_weights_only(tmp_path):
    model = GPT.from_preset("gpt-tiny")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file() and not (tmp_path / "bin" / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bin")
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    again = GPT.from_pretrained(tmp_path / "bin")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    marker = tmp_path / "pwned"
    state = load_hf_checkpoint(tmp_path / "bin")[1]
    torch.save({**state, "extra": _RunsCode(str(marker))}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is not a loadable PyTorch weights file"):
        GPT.from_pretrained(tmp_path / "bin")
    assert not marker.exists()


# --------------------------------------------------------------------------------- sharded checkpoints

def test_sharded_save_loads_in_transformers_and_back_and_old_shards_go(tmp_path):
    model = GPT.from_preset("gpt-tiny")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    again = GPT.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        ref = model.eval()(ids).logits
        assert torch.equal(again(ids).logits, ref)
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-4, atol=1e-5)
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path)  # unsharded now: the shards and their index must not survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path, max_shard_size="lots")
    with pytest.raises(ValueError, match="positive"):
        model.save_pretrained(tmp_path, max_shard_size=0)


def sharded(tmp_path):
    GPT.from_preset("gpt-tiny").save_pretrained(tmp_path / "ckpt", max_shard_size="200KB")
    directory = tmp_path / "ckpt"
    index_file = directory / "model.safetensors.index.json"
    return directory, index_file, json.loads(index_file.read_text())


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "subdir", "symlink"])
def test_shard_index_naming_files_outside_its_directory_is_refused(tmp_path, escape):
    directory, index_file, index = sharded(tmp_path)
    victim = next(iter(index["weight_map"]))
    shard = index["weight_map"][victim]
    outside = tmp_path / "outside.safetensors"
    os.replace(directory / shard, outside)  # a valid shard, but out of the directory
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "subdir": "sub/outside.safetensors",
            "symlink": shard}[escape]
    if escape == "symlink":
        (directory / shard).symlink_to(outside)
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="refused"):
        GPT.from_pretrained(directory)


def test_shard_index_symlinks_inside_and_hub_cache_blobs_are_followed(tmp_path):
    directory, index_file, index = sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[0]
    os.replace(directory / shard, directory / "real.bin.safetensors")
    (directory / shard).symlink_to("real.bin.safetensors")  # inside: fine
    GPT.from_pretrained(directory)
    # The Hugging Face cache layout: snapshots/REV/* are links into the repository's blobs/.
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, entry in enumerate(sorted(directory.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(entry.resolve().read_bytes())
        (snapshot / entry.name).symlink_to(os.path.relpath(blob, snapshot))
    GPT.from_pretrained(snapshot)
    (directory / index_file.name).write_text(json.dumps({**index, "weight_map": {**index["weight_map"],
                                                                                  "x": "missing.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names the shard 'missing.safetensors'"):
        GPT.from_pretrained(directory)


# ------------------------------------------------------------------------------------------ tokenizer

def llmkit_tokenizer(vocab_size=300):
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the cat sat on the mat", "a dog ate the bone"] * 10, trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_save_pretrained_writes_the_tokenizer_beside_the_weights(tmp_path):
    tok = llmkit_tokenizer()
    model = GPT.from_preset("gpt-tiny", vocab_size=len(tok))
    (tmp_path / "notes.txt").write_text("mine")
    old_umask = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path, tokenizer=tok)
        model.save_pretrained(tmp_path / "new")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750  # not mkdtemp's 0700
    for entry in tmp_path.iterdir():
        if entry.name not in ("notes.txt", "new"):
            assert stat.S_IMODE(entry.stat().st_mode) == 0o640, entry.name  # the umask's, not mkstemp's 0600
    again = Tokenizer.from_file(tmp_path)
    assert again.encode("the cat", add_special_tokens=False) == tok.encode("the cat", add_special_tokens=False)
    assert again.eos_token_id == tok.eos_token_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok("a dog ate")["input_ids"] == tok.encode("a dog ate")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # A transformers tokenizer is saved with its own save_pretrained.
    GPT.from_preset("gpt-tiny", vocab_size=len(tok)).save_pretrained(tmp_path / "hf", tokenizer=hf_tok)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("a dog")["input_ids"] == tok.encode("a dog")
    with pytest.raises(ValueError, match="the tokenizer has .* tokens but the model's vocabulary has 100"):
        GPT.from_preset("gpt-tiny", vocab_size=100).save_pretrained(tmp_path / "small", tokenizer=tok)
    assert not (tmp_path / "small").exists()


def test_a_failed_save_leaves_the_previous_one_whole(tmp_path):
    model = GPT.from_preset("gpt-tiny")
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError, match="tokenizer must be"):
        GPT.from_preset("gpt-tiny").save_pretrained(tmp_path, tokenizer="not a tokenizer")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


@pytest.mark.parametrize("family", ["t5", "longformer"])
def test_every_family_saves_with_a_tokenizer(family, tmp_path):
    tok = llmkit_tokenizer(vocab_size=280)
    if family == "t5":
        model = T5.from_preset("t5-tiny", vocab_size=len(tok))
    else:
        model = Longformer.from_preset("longformer-tiny", vocab_size=len(tok))
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert Tokenizer.from_file(tmp_path).encode("the mat") == tok.encode("the mat")
    again = type(model).from_pretrained(tmp_path)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_summarize_keys_groups_layers():
    keys = [f"h.{i}.attn.w" for i in range(2, 12)] + [f"h.{i}.mlp.w" for i in range(2, 12)] + ["ln_f.weight"]
    assert summarize_keys(keys) == "h.{2..11}.* (20 tensors), ln_f.weight"
    assert summarize_keys(["a.1.x", "a.3.y"]) == "a.{1,3}.* (2 tensors)"


def test_special_ids_come_from_the_saved_tokenizer_when_the_config_has_none(tmp_path):
    tok = llmkit_tokenizer()
    GPT.from_preset("gpt-tiny", vocab_size=len(tok)).save_pretrained(tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 2, 1)
    assert GPT.from_pretrained(tmp_path).config.eos_token_id == 2
    GPT.from_preset("gpt-tiny", eos_token_id=5).save_pretrained(tmp_path / "own", tokenizer=tok)
    assert json.loads((tmp_path / "own" / "config.json").read_text())["eos_token_id"] == 5  # the model's wins
    GPT.from_preset("gpt-tiny").save_pretrained(tmp_path / "none")  # no ids at all: null, not GPT-2's 50256
    assert transformers.AutoConfig.from_pretrained(tmp_path / "none").eos_token_id is None
