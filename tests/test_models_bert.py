"""BERT / RoBERTa (llmkit.models.bert) against transformers' fp32 forward and backward.

Tiny random-weight models built from transformers' BertConfig / RobertaConfig
(head_dim 16), a batch with padding; outputs are compared on the real tokens.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.models.bert import (BERT, BertConfig, BertForMaskedLM, BertForPreTraining,  # noqa: E402
                                BertForSequenceClassification, BertForTokenClassification)

VOCAB, BATCH, SEQLEN = 99, 3, 13
LENGTHS = (13, 9, 4)  # right padding, as BERT / RoBERTa tokenizers pad

HF_CLASSES = {
    ("bert", BERT): "BertModel",
    ("bert", BertForMaskedLM): "BertForMaskedLM",
    ("bert", BertForPreTraining): "BertForPreTraining",
    ("bert", BertForSequenceClassification): "BertForSequenceClassification",
    ("bert", BertForTokenClassification): "BertForTokenClassification",
    ("roberta", BERT): "RobertaModel",
    ("roberta", BertForMaskedLM): "RobertaForMaskedLM",
    ("roberta", BertForSequenceClassification): "RobertaForSequenceClassification",
    ("roberta", BertForTokenClassification): "RobertaForTokenClassification",
}
CASES = list(HF_CLASSES)
IDS = [f"{t}-{c.__name__}" for t, c in CASES]


def hf_config(model_type: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    if model_type == "bert":
        return transformers.BertConfig(max_position_embeddings=24, **common)
    return transformers.RobertaConfig(max_position_embeddings=SEQLEN + 2, type_vocab_size=1, layer_norm_eps=1e-5,
                                      pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)


def hf_model(model_type: str, cls, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[model_type, cls])(hf_config(model_type)).eval()
    with torch.no_grad():  # off the init (zero biases, unit norms) so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(model_type: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pad_id = 0 if model_type == "bert" else 1
    ids = torch.randint(3, VOCAB, (BATCH, SEQLEN), generator=g)
    mask = torch.zeros(BATCH, SEQLEN, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    ids[mask == 0] = pad_id
    types = torch.zeros_like(ids)
    if model_type == "bert":
        types[:, 6:] = 1
        types[mask == 0] = 0
    return ids, mask, types


def hf_logits(model, out):
    return out.prediction_logits if hasattr(out, "prediction_logits") else (
        out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits)


def assert_close(ours, theirs, rtol=1e-4):
    scale = theirs.abs().max().item()
    assert scale > 0
    err = (ours - theirs).abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


def per_sequence(cls) -> bool:
    return cls is BertForSequenceClassification


@pytest.mark.parametrize("model_type,cls", CASES, ids=IDS)
def test_logits_match_transformers(model_type, cls, device):
    hf = hf_model(model_type, cls).to(device)
    ours = cls.from_hf(hf).eval().to(device)
    ids, mask, types = (t.to(device) for t in batch(model_type))
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, mask, token_type_ids=types)
    real = mask.bool()
    if cls is BERT:
        assert_close(out.last_hidden_state[real], theirs.last_hidden_state[real])
        assert_close(out.extra["pooler_output"], theirs.pooler_output)
        assert (out.last_hidden_state[~real] == 0).all()
    elif per_sequence(cls):
        assert out.logits.shape == (BATCH, 3)
        assert_close(out.logits, theirs.logits)
    else:
        assert_close(out.logits[real], hf_logits(hf, theirs)[real])
    if cls is BertForPreTraining:
        assert_close(out.extra["nsp_logits"], theirs.seq_relationship_logits)


def labels_for(cls, mask, seed=2):
    g = torch.Generator().manual_seed(seed)
    if per_sequence(cls):
        return torch.randint(0, 3, (BATCH,), generator=g)
    n = VOCAB if cls in (BertForMaskedLM, BertForPreTraining) else 3
    labels = torch.randint(0, n, mask.shape, generator=g)
    drop = torch.rand(mask.shape, generator=g) < 0.5
    labels[drop | (mask == 0)] = -100  # ignored positions, padding included
    return labels


@pytest.mark.parametrize("model_type,cls", [c for c in CASES if c[1] is not BERT],
                         ids=[i for i, c in zip(IDS, CASES) if c[1] is not BERT])
def test_loss_and_gradients_match_transformers(model_type, cls):
    hf = hf_model(model_type, cls)
    ours = cls.from_hf(hf)
    ids, mask, types = batch(model_type)
    labels = labels_for(cls, mask)
    kwargs = {}
    if cls is BertForPreTraining:
        kwargs["next_sentence_label"] = torch.tensor([0, 1, 1])
    theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, **kwargs)
    out = ours(ids, mask, token_type_ids=types, labels=labels, **kwargs)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    theirs.loss.backward()
    out.loss.backward()
    hf_params = hf.state_dict(keep_vars=True)
    names = ours._hf_names()
    for name, p in ours.named_parameters():
        ref = hf_params[names[name]].grad
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        scale = max(ref.abs().max().item(), 1e-6)
        assert (p.grad - ref).abs().max().item() <= 1e-4 * scale + 1e-7, name


@pytest.mark.parametrize("model_type,cls", CASES, ids=IDS)
def test_padded_and_packed_batches_agree(model_type, cls, device):
    ours = cls.from_hf(hf_model(model_type, cls)).eval().to(device)
    ids, mask, types = (t.to(device) for t in batch(model_type))
    real = mask.bool()
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    labels = labels_for(cls, mask.cpu()).to(device)
    packed_labels = labels if per_sequence(cls) else labels[real]
    with torch.no_grad():
        padded = ours(ids, mask, token_type_ids=types, **({} if cls is BERT else {"labels": labels}))
        packed = ours(ids[real], cu_seqlens=cu, token_type_ids=types[real],
                      **({} if cls is BERT else {"labels": packed_labels}))
    torch.testing.assert_close(packed.last_hidden_state, padded.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    if cls is BERT:
        torch.testing.assert_close(packed.extra["pooler_output"], padded.extra["pooler_output"])
    elif per_sequence(cls):
        torch.testing.assert_close(packed.logits, padded.logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(packed.logits, padded.logits[real], rtol=1e-5, atol=1e-5)
    if cls is not BERT:
        torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type,cls", CASES, ids=IDS)
def test_to_hf_round_trip(model_type, cls, tmp_path):
    ours = cls.from_hf(hf_model(model_type, cls)).eval()
    ours.to_hf(tmp_path)
    loaded = getattr(transformers, HF_CLASSES[model_type, cls]).from_pretrained(tmp_path).eval()
    assert loaded.config.model_type == model_type
    assert loaded.config.architectures == [HF_CLASSES[model_type, cls]]
    again = cls.from_hf(tmp_path).eval()
    ids, mask, types = batch(model_type, seed=5)
    real = mask.bool()
    with torch.no_grad():
        theirs = loaded(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out, out2 = ours(ids, mask, token_type_ids=types), again(ids, mask, token_type_ids=types)
    if cls is BERT:
        assert_close(out.last_hidden_state[real], theirs.last_hidden_state[real])
    elif per_sequence(cls):
        assert_close(out.logits, theirs.logits)
    else:
        assert_close(out.logits[real], hf_logits(loaded, theirs)[real])
    for a, b in ((out.logits, out2.logits), (out.last_hidden_state, out2.last_hidden_state)):
        if a is not None:
            assert torch.equal(a, b)


def test_from_hf_directory_and_head_on_base_checkpoint(tmp_path):
    hf = hf_model("bert", BERT)
    hf.save_pretrained(tmp_path)
    base = BERT.from_hf(tmp_path)
    assert BERT.from_hf(tmp_path, dtype=torch.bfloat16).word_embeddings.weight.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="newly initialised"):
        clf = BertForSequenceClassification.from_hf(tmp_path, num_labels=5)
    assert clf.classifier["out_proj"].out_features == 5
    for name, p in base.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[name], p), name
    # A pretraining checkpoint loads into the bare encoder (heads ignored), pooler included.
    pre = hf_model("bert", BertForPreTraining)
    enc = BERT.from_hf(pre)
    assert enc.pooler is not None
    assert torch.equal(enc.pooler.weight, pre.bert.pooler.dense.weight)
    # Broken checkpoints: a missing encoder weight, a shape the config does not give.
    from llmkit.models.hf_io import load_hf_checkpoint, save_hf_checkpoint
    config, state = load_hf_checkpoint(tmp_path)
    broken = {k: v for k, v in state.items() if "layer.1.output.dense.weight" not in k}
    save_hf_checkpoint(tmp_path / "missing", config, broken)
    with pytest.raises(ValueError, match="missing from the checkpoint: bert.encoder.layer.1.output.dense.weight"):
        BERT.from_hf(tmp_path / "missing")
    save_hf_checkpoint(tmp_path / "shape", {**config, "intermediate_size": 40}, state)
    with pytest.raises(ValueError, match="shapes do not match the config: bert.encoder.layer.0.intermediate"):
        BERT.from_hf(tmp_path / "shape")
    # The MLM decoder is tied to the word embeddings: one table.
    mlm = BertForMaskedLM.from_hf(hf_model("bert", BertForMaskedLM))
    assert mlm.num_parameters() == sum(p.numel() for p in mlm.parameters())


def test_roberta_positions_follow_input_ids():
    ours = BERT.from_hf(hf_model("roberta", BERT)).eval()
    hf = hf_model("roberta", BERT)
    ids, mask, _ = batch("roberta")
    ids[0, 5] = 1  # a pad id inside a real sequence keeps position pad_token_id, as in transformers
    with torch.no_grad():
        out = ours(ids, mask).last_hidden_state
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(out[mask.bool()], theirs[mask.bool()])


def test_presets_and_configs():
    with torch.device("meta"):
        assert BERT.from_preset("bert-base").num_parameters() == 109_482_240  # bert-base-uncased
        assert BERT.from_preset("roberta-base").num_parameters() == 124_645_632
    tiny = BertForMaskedLM.from_preset("bert-tiny")
    assert tiny.config.hidden_size == 128 and tiny.config.num_hidden_layers == 2
    assert BERT.from_preset("bert-tiny", num_hidden_layers=1).config.num_hidden_layers == 1
    roberta = BertConfig.from_preset("roberta-base")
    assert roberta.position_offset == 2 and roberta.max_length == 512
    hf = roberta.to_hf_config()
    assert hf["model_type"] == "roberta" and hf["bos_token_id"] == 0
    assert BertConfig.from_hf_config(hf) == roberta
    assert BertConfig.from_hf_config(transformers.BertConfig().to_dict()) == BertConfig()
    with pytest.raises(ValueError, match="unknown BertConfig preset"):
        BertConfig.from_preset("bert-huge")
    with pytest.raises(ValueError, match="unknown BertConfig preset"):
        BertConfig.from_preset("longformer-base")
    with pytest.raises(ValueError, match="head_dim"):
        BertConfig(hidden_size=36, num_attention_heads=3)
    with pytest.raises(ValueError, match="reads model_type"):
        BertConfig.from_hf_config(transformers.GPT2Config().to_dict())


def test_bad_inputs_raise_clear_errors():
    model = BertForMaskedLM.from_hf(hf_model("bert", BertForMaskedLM))
    ids, mask, _ = batch("bert")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        model(torch.randint(3, VOCAB, (1, 25)))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        model(ids, mask * 2)
    with pytest.raises(ValueError, match="no real token"):
        model(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, mask, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="token_type_ids must have"):
        model(ids, mask, token_type_ids=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.float())
    model(ids)  # fine: a padded batch without a mask is all real tokens
    with pytest.raises(ValueError, match="packed \\(total,\\) with cu_seqlens"):
        model(ids.flatten())
    with pytest.raises(ValueError, match="must start at 0 and end"):
        model(ids.flatten(), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="no empty sequence"):
        model(ids.flatten(), cu_seqlens=torch.tensor([0, 0, ids.numel()], dtype=torch.int32))
    with pytest.raises(ValueError, match="packed 1-D"):
        model(ids, cu_seqlens=torch.tensor([0, ids.numel()], dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected inputs"):
        model(ids, mask, global_attention_mask=mask)
    with pytest.raises(ValueError, match="RoBERTa|no transformers counterpart"):
        BertForPreTraining(BertConfig.from_preset("roberta-base", num_hidden_layers=1)).to_hf("/tmp/never")


def test_training_step_runs_with_dropout():
    model = BertForMaskedLM(BertConfig.from_preset("bert-tiny", vocab_size=VOCAB))
    model.train()
    ids, mask, _ = batch("bert")
    out = model(ids, mask, labels=labels_for(BertForMaskedLM, mask))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()
