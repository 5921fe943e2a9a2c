"""Longformer (llmkit.models.longformer) against transformers' LongformerModel /
LongformerForMaskedLM: sliding windows smaller than the sequence, several
global tokens, padding; from_roberta; the to_hf round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.models.bert import BERT, BertForMaskedLM  # noqa: E402
from llmkit.models.longformer import Longformer, LongformerConfig, LongformerForMaskedLM  # noqa: E402

VOCAB, BATCH, SEQLEN = 99, 3, 21
LENGTHS = (21, 15, 7)
HF_CLASSES = {Longformer: "LongformerModel", LongformerForMaskedLM: "LongformerForMaskedLM"}


def hf_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  max_position_embeddings=40, attention_window=[4, 6], type_vocab_size=1, layer_norm_eps=1e-5,
                  pad_token_id=1)
    return transformers.LongformerConfig(**{**kwargs, **overrides})


def hf_model(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[cls])(hf_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQLEN), generator=g)
    mask = torch.zeros(BATCH, SEQLEN, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    ids[mask == 0] = 1
    glob = torch.zeros_like(ids)
    glob[0, [0, 10, 19]] = 1          # <s> and two tokens far outside each other's windows
    glob[1, 13] = 1                   # one, not at the start
    glob[2, 12] = 1                   # on padding: ignored (transformers does the same), so none
    return ids, mask, glob


def output(cls, out):
    return out.last_hidden_state if cls is Longformer else out.logits


def assert_close(ours, theirs, rtol=1e-4):
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert scale > 0 and err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("cls", [Longformer, LongformerForMaskedLM])
@pytest.mark.parametrize("with_global", [False, True])
def test_matches_transformers(cls, with_global, device):
    hf = hf_model(cls).to(device)
    ours = cls.from_hf(hf).eval().to(device)
    assert ours.config.attention_window == [4, 6]
    ids, mask, glob = (t.to(device) for t in batch())
    glob = glob if with_global else None
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
        out = ours(ids, mask, global_attention_mask=glob)
    real = mask.bool()
    assert_close(output(cls, out)[real], output(cls, theirs)[real])
    if cls is Longformer:
        assert_close(out.extra["pooler_output"], theirs.pooler_output)


def test_loss_and_gradients_match_transformers():
    hf = hf_model(LongformerForMaskedLM)
    ours = LongformerForMaskedLM.from_hf(hf)
    ids, mask, glob = batch()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5, ids, -100)
    labels[mask == 0] = -100
    theirs = hf(input_ids=ids, attention_mask=mask, global_attention_mask=glob, labels=labels)
    out = ours(ids, mask, global_attention_mask=glob, labels=labels)
    torch.testing.assert_close(out.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    theirs.loss.backward()
    out.loss.backward()
    hf_params, names = hf.state_dict(keep_vars=True), ours._hf_names()
    for name, p in ours.named_parameters():
        ref = hf_params[names[name]].grad
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1e-6) + 1e-7, name
    assert ours.encoder.layers[0].attn.query_global.weight.grad.abs().sum() > 0


def test_padded_and_packed_agree(device):
    ours = LongformerForMaskedLM.from_hf(hf_model(LongformerForMaskedLM)).eval().to(device)
    ids, mask, glob = (t.to(device) for t in batch())
    real = mask.bool()
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    with torch.no_grad():
        padded = ours(ids, mask, global_attention_mask=glob).logits[real]
        packed = ours(ids[real], cu_seqlens=cu, global_attention_mask=glob[real]).logits
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [Longformer, LongformerForMaskedLM])
def test_to_hf_round_trip(cls, tmp_path):
    ours = cls.from_hf(hf_model(cls)).eval()
    ours.to_hf(tmp_path)
    loaded = getattr(transformers, HF_CLASSES[cls]).from_pretrained(tmp_path).eval()
    assert loaded.config.attention_window == [4, 6]
    assert loaded.config.architectures == [HF_CLASSES[cls]]
    ids, mask, glob = batch(seed=7)
    real = mask.bool()
    with torch.no_grad():
        theirs = loaded(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
        out = ours(ids, mask, global_attention_mask=glob)
        again = cls.from_hf(tmp_path).eval()(ids, mask, global_attention_mask=glob)
    assert_close(output(cls, out)[real], output(cls, theirs)[real])
    assert torch.equal(output(cls, out), output(cls, again))


def roberta(seed=0):
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=48, max_position_embeddings=18, type_vocab_size=1,
                                        layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    model = transformers.RobertaForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("source", ["transformers", "directory", "llmkit"])
def test_from_roberta_computes_what_roberta_does(source, tmp_path):
    rob = roberta()
    src = {"transformers": lambda: rob, "directory": lambda: (rob.save_pretrained(tmp_path), tmp_path)[1],
           "llmkit": lambda: BertForMaskedLM.from_hf(rob)}[source]()
    # 16 positions in RoBERTa; 40 here. A window of 32 covers the whole 13-token input.
    lf = LongformerForMaskedLM.from_roberta(src, max_positions=40, attention_window=32).eval()
    assert lf.config.max_position_embeddings == 42 and lf.config.attention_window == [32, 32]
    table, old = lf.encoder.position_embeddings.weight, rob.roberta.embeddings.position_embeddings.weight
    assert torch.equal(table[:18], old)
    assert torch.equal(table[18:34], old[2:]) and torch.equal(table[34:], old[2:10])
    attn = lf.encoder.layers[1].attn
    assert torch.equal(attn.key_global.weight, attn.key.weight)
    assert attn.key_global.weight.data_ptr() != attn.key.weight.data_ptr()  # copies, trained apart
    ids = torch.randint(3, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[mask == 0] = 1
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    real = mask.bool()
    with torch.no_grad():
        theirs = rob(input_ids=ids, attention_mask=mask).logits[real]
        for g in (None, glob):
            assert_close(lf(ids, mask, global_attention_mask=g).logits[real], theirs, rtol=1e-5)
    # The encoder alone, too.
    base = Longformer.from_roberta(src, max_positions=40, attention_window=32).eval()
    with torch.no_grad():
        assert_close(base(ids, mask).last_hidden_state[real],
                     rob.roberta(input_ids=ids, attention_mask=mask).last_hidden_state[real], rtol=1e-5)


def test_presets_and_config():
    with torch.device("meta"):
        assert Longformer.from_preset("longformer-base").num_parameters() == 148_659_456  # longformer-base-4096
    tiny = LongformerConfig.from_preset("longformer-tiny")
    assert tiny.attention_window == [64, 64] and tiny.max_length == 4096
    assert LongformerConfig.from_hf_config(tiny.to_hf_config()) == tiny
    with pytest.raises(ValueError, match="positive and even"):
        LongformerConfig(num_hidden_layers=2, attention_window=5)
    with pytest.raises(ValueError, match="2 layers"):
        LongformerConfig(num_hidden_layers=2, attention_window=[4, 4, 4])
    with pytest.raises(ValueError, match="unknown LongformerConfig preset"):
        LongformerConfig.from_preset("bert-base")


def test_bad_inputs_raise_clear_errors():
    model = LongformerForMaskedLM.from_hf(hf_model(LongformerForMaskedLM))
    ids, mask, glob = batch()
    with pytest.raises(ValueError, match="global_attention_mask must have input_ids' shape"):
        model(ids, mask, global_attention_mask=glob[:, :5])
    with pytest.raises(ValueError, match="0 \\(local\\) and 1"):
        model(ids, mask, global_attention_mask=glob * 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids + VOCAB, mask)
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        model(torch.randint(3, VOCAB, (1, 39)))
    with pytest.raises(ValueError, match="needs a RoBERTa checkpoint"):
        Longformer.from_roberta(transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)))
    with pytest.raises(ValueError, match="reads model_type"):
        Longformer.from_hf(roberta())
    with pytest.raises(ValueError, match="reads model_type"):
        BERT.from_hf(hf_model(Longformer))
