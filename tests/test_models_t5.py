"""T5 against transformers' T5ForConditionalGeneration on tiny random-weight
models (ReLU and gated-GELU, tied and untied): logits with padding, loss,
gradients, checkpoints both ways, greedy generation with the KV cache, and
bad input. Nothing is downloaded."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.models.t5 import T5, T5Config, relative_position_bucket  # noqa: E402

VOCAB = 99


def hf_model(feed_forward_proj="relu", tie=True, seed=0, decoder_layers=3):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=decoder_layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not tie:  # transformers >= 5 ties the modules anyway; give lm_head its own values
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.2)
    with torch.no_grad():  # layer norms away from 1, so their mapping matters
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def batch(seed=1, src=(23, 17), tgt=(11, 6)):
    """Right-padded source and target batches with their masks (lengths
    beyond max_distance=20, so the log buckets are used)."""
    g = torch.Generator().manual_seed(seed)
    src_len, tgt_len = max(src), max(tgt)
    input_ids = torch.randint(2, VOCAB, (len(src), src_len), generator=g)
    attention_mask = (torch.arange(src_len)[None] < torch.tensor(src)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(2, VOCAB, (len(tgt), tgt_len), generator=g)
    decoder_mask = (torch.arange(tgt_len)[None] < torch.tensor(tgt)[:, None]).long()
    labels = labels.masked_fill(decoder_mask == 0, -100)
    return input_ids, attention_mask, labels, decoder_mask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


VARIANTS = [("relu", True), ("gated-gelu", False), ("gated-gelu", True), ("relu", False)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{'tied' if v[1] else 'untied'}")
def pair(request):
    hf = hf_model(*request.param)
    return hf, T5.from_hf(hf).eval()


def test_logits_and_loss_match_transformers(pair):
    hf, ours = pair
    input_ids, attention_mask, labels, decoder_mask = batch()
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    decoder_attention_mask=decoder_mask)
        mine = ours(input_ids, attention_mask=attention_mask, labels=labels, decoder_attention_mask=decoder_mask)
    assert mine.logits.shape == theirs.logits.shape
    assert rel_err(mine.logits, theirs.logits) < 1e-4
    assert abs(mine.loss.item() - theirs.loss.item()) < 1e-4 * abs(theirs.loss.item())
    assert rel_err(mine.extra["encoder_last_hidden_state"], theirs.encoder_last_hidden_state) < 1e-4


def test_explicit_decoder_inputs_match(pair):
    hf, ours = pair
    input_ids, attention_mask, _, _ = batch(seed=2, src=(9, 9, 4), tgt=(5, 5, 5))
    decoder_input_ids = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        mine = ours(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    assert rel_err(mine, theirs) < 1e-4


def test_gradients_match_transformers(pair):
    hf, ours = pair
    input_ids, attention_mask, labels, _ = batch(seed=4)
    hf.zero_grad()
    ours.zero_grad()
    hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    ours(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, hf_name in ours._hf_names().items():
        mine = dict(ours.named_parameters())[name].grad
        theirs = hf_params[hf_name].grad
        assert mine is not None and torch.isfinite(mine).all(), name
        if name == "shared.weight" or (name == "lm_head.weight" and hf.lm_head.weight is hf.shared.weight):
            continue  # transformers ties these modules: their grads are summed, compared below
        assert rel_err(mine, theirs) < 1e-3, name
    if hf.lm_head.weight is hf.shared.weight:
        summed = ours.shared.weight.grad + (ours.lm_head.weight.grad if ours.lm_head is not None else 0)
        assert rel_err(summed, hf.shared.weight.grad) < 1e-3
    else:
        assert rel_err(ours.shared.weight.grad, hf.shared.weight.grad) < 1e-3


def test_checkpoint_round_trip(pair, tmp_path):
    hf, ours = pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = T5.from_hf(tmp_path / "hf").eval()
    ours.to_hf(tmp_path / "ours")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    input_ids, attention_mask, labels, _ = batch(seed=5)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        assert torch.equal(loaded(input_ids, attention_mask=attention_mask, labels=labels).logits,
                           ours(input_ids, attention_mask=attention_mask, labels=labels).logits)
        assert torch.equal(back(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits, expected)


def test_generate_matches_transformers(pair):
    hf, ours = pair
    input_ids, attention_mask, _, _ = batch(seed=6, src=(13, 7, 10))
    # use_cache=False: transformers 5.24's cache has num_layers (encoder) slots,
    # so its cached generate fails when the decoder is deeper (IndexError).
    theirs = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=12,
                         use_cache=False)
    mine = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12)
    assert torch.equal(mine, theirs)


def test_generate_stops_at_eos():
    """Sequences that emit eos get padding after it; decoding stops once all have."""
    hf = hf_model("relu", False, seed=1, decoder_layers=2)  # symmetric: transformers' cache works
    hf.config.eos_token_id = hf.generation_config.eos_token_id = 70  # a token this model emits early
    ours = T5.from_hf(hf).eval()
    assert ours.config.eos_token_id == 70
    input_ids, attention_mask, _, _ = batch(seed=7, src=(8, 5))
    theirs = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=15)
    mine = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=15)
    assert torch.equal(mine, theirs)
    assert mine.shape[1] < 16 and (mine == 70).any(dim=1).all() and (mine[:, -1] == 70).any()
    assert (mine[1, (mine[1] == 70).nonzero()[0, 0] + 1:] == 0).all()  # padding after eos


def test_cache_equals_full_decode():
    model = T5.from_preset("t5-tiny", dropout_rate=0.0).eval()
    input_ids = torch.randint(2, 1024, (2, 9))
    tokens = model.generate(input_ids, max_new_tokens=7)
    with torch.no_grad():
        full = model(input_ids, decoder_input_ids=tokens[:, :-1]).logits
    assert torch.equal(full.argmax(-1), tokens[:, 1:])


def test_relative_position_buckets():
    rel = torch.arange(-200, 201)
    both = relative_position_bucket(rel, True, 32, 128)
    past = relative_position_bucket(rel, False, 32, 128)
    assert both.min() == 0 and both.max() == 31 and past.min() == 0 and past.max() == 31
    assert (past[rel >= 0] == 0).all()  # the decoder gives every future offset one bucket
    assert both[200] == 0 and both[201] == 17 and both[199] == 1  # offset 0, +1, -1
    assert (both[:73] == 15).all()  # beyond max_distance: the last bucket of the direction


def test_presets_and_config():
    tiny = T5.from_preset("t5-tiny")
    assert 100_000 < tiny.num_parameters() < 1_000_000
    small = T5Config.from_preset("t5-small")
    assert (small.d_model, small.num_layers, small.num_heads, small.vocab_size) == (512, 6, 8, 32128)
    with torch.device("meta"):
        assert abs(T5(small).num_parameters() - 60_506_624) < 1000
    hf = small.to_hf_config()
    assert transformers.T5Config(**hf).d_ff == 2048
    assert T5Config.from_hf_config(hf) == small
    with pytest.raises(ValueError, match="unknown T5 preset"):
        T5Config.from_preset("t5-huge")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swiglu")
    with pytest.raises(ValueError, match="d_kv"):
        T5Config(d_kv=12)


def test_bad_input():
    model = T5.from_preset("t5-tiny").eval()
    ids = torch.randint(2, 1024, (2, 5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 3), 1024), decoder_input_ids=ids[:1])
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long), decoder_input_ids=ids[:1])
    with pytest.raises(ValueError, match="2-D"):
        model(ids[0], decoder_input_ids=ids)
    with pytest.raises(TypeError, match="integer"):
        model(ids.float(), decoder_input_ids=ids)
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        model(ids)
    with pytest.raises(ValueError, match="attention_mask must have"):
        model(ids, attention_mask=torch.ones(2, 4), decoder_input_ids=ids)
    with pytest.raises(ValueError, match="labels hold ids outside"):
        model(ids, labels=torch.full((2, 3), 5000))
    with pytest.raises(ValueError, match="batch"):
        model(ids, decoder_input_ids=ids[:1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)
