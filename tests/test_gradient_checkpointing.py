"""Gradient checkpointing (transformers' gradient_checkpointing_enable / _disable):
the same gradients as a plain backward, with every block run twice per step.

float32 throughout: llmkit's attention kernels take no float64. The recomputed
forward runs the same kernels on the same inputs, so the gradients agree to
rounding (in practice bit for bit)."""

import pytest
import torch

from llmkit.models import GPT
from llmkit.models.bert import BERT, BertForMaskedLM, BertForSequenceClassification
from llmkit.models.t5 import T5

VOCAB = 128


def gpt(preset):
    torch.manual_seed(0)
    return GPT.from_preset(preset, vocab_size=VOCAB, block_size=32, dropout=0.0)


def bert_mlm():
    torch.manual_seed(0)
    return BertForMaskedLM.from_preset("bert-tiny", vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)


def t5():
    torch.manual_seed(0)
    return T5.from_preset("t5-tiny", vocab_size=VOCAB, dropout_rate=0.0)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (3, 24), generator=g)
    labels = torch.randint(5, VOCAB, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # one padded row: the packed (varlen) path of BERT
    return ids, labels, mask


def loss_of(family, model, ids, labels, mask):
    if family == "bert":
        return model(ids, attention_mask=mask, labels=labels.masked_fill(mask == 0, -100)).loss
    if family == "t5":
        return model(ids, attention_mask=mask, labels=labels[:, :10]).loss
    return model(ids, labels=ids).loss


def grads(family, model, checkpointing):
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_of(family, model, *batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def blocks(family, model):
    if family == "gpt":
        return list(model.transformer.h)
    if family == "bert":
        return list(model.encoder.layers)
    return list(model.encoder) + list(model.decoder)


FAMILIES = [("gpt", lambda: gpt("gpt-tiny")), ("llama", lambda: gpt("llama-tiny")),
            ("bert", bert_mlm), ("t5", t5)]


@pytest.mark.parametrize("family,build", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_same_gradients(family, build):
    family = "gpt" if family == "llama" else family
    model = build()
    loss_plain, plain = grads(family, model, False)
    loss_ckpt, ckpt = grads(family, model, True)
    assert model.gradient_checkpointing
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("family,build", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_blocks_are_recomputed(family, build):
    family = "gpt" if family == "llama" else family
    model = build()
    calls = []
    for i, block in enumerate(blocks(family, model)):
        # A pre-hook: the recomputation stops early once it has what backward needs (torch
        # checkpoint early stop), so a post-forward hook would not see it.
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    n = len(blocks(family, model))

    grads(family, model, False)
    assert len(calls) == n  # one forward per block
    calls.clear()
    grads(family, model, True)
    assert len(calls) == 2 * n  # forward + the recomputation in backward
    assert sorted(set(calls)) == list(range(n))

    # No recomputation outside training with grad: eval, or no_grad.
    calls.clear()
    model.eval()
    loss_of(family, model, *batch()).backward()
    assert len(calls) == n
    calls.clear()
    model.train()
    with torch.no_grad():
        loss_of(family, model, *batch())
    assert len(calls) == n


def test_gpt_cached_decoding_untouched():
    model = gpt("gpt-tiny")
    model.gradient_checkpointing_enable()
    model.eval()
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(prompt).logits[0, -1]
        from llmkit.models import KVCache
        cache = KVCache(model.config, batch=1, max_len=16)
        got = model(prompt[0], cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), kv_cache=cache,
                    logits_to_keep="last").logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bert_heads_delegate_to_the_encoder():
    model = BertForSequenceClassification.from_preset("bert-tiny", vocab_size=VOCAB)
    assert model.gradient_checkpointing is False
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing and model.encoder.gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.encoder.gradient_checkpointing
    model.gradient_checkpointing = True  # transformers lets the attribute be set directly too
    assert model.encoder.gradient_checkpointing
    encoder = BERT.from_preset("bert-tiny", vocab_size=VOCAB)
    encoder.gradient_checkpointing_enable({"use_reentrant": False})
    assert encoder.gradient_checkpointing


def test_dropout_masks_replayed():
    """With dropout on, the recomputation replays the same masks (torch restores the RNG state)."""
    torch.manual_seed(0)
    model = GPT.from_preset("gpt-tiny", vocab_size=VOCAB, block_size=32, dropout=0.2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(ids, labels=ids).loss.backward()
        out[on] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
