"""The transformers reference of `llmkit bench pretrain`: the model mapping is
the same architecture as llmkit's (parameter counts, and identical losses from
identical weights), the Trainer consumes exactly the batches it is given, in
order, and val_loss is the token-weighted mean over the validation set."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from llmkit.bench.pretrain_reference import build_reference_model, train_reference  # noqa: E402
from llmkit.models import GPT, GPTConfig  # noqa: E402
from llmkit.models.bert import BertConfig, BertForMaskedLM  # noqa: E402

VOCAB, L, B = 256, 32, 4
MASK_ID = 4
OPTIM = dict(lr=1e-12, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, seed=0)  # weights barely move


def gpt_config(preset="gpt-tiny"):
    return dataclasses.asdict(GPTConfig.preset(preset, vocab_size=VOCAB, block_size=L))


def bert_config():
    return dataclasses.asdict(BertConfig.from_preset("bert-tiny", vocab_size=VOCAB, max_position_embeddings=64,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def blocks(n, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, L), dtype=np.int64)


def mlm_batch(seed, rows=B):
    """Pre-masked, as the llmkit side's objective hands them over: 15% scored, those set to [MASK]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (rows, L))
    scored = rng.random((rows, L)) < 0.15
    scored[:, 0] = True  # every row scores something
    labels = np.where(scored, ids, -100)
    ids = np.where(scored, MASK_ID, ids)
    mask = np.ones((rows, L), dtype=np.int64)
    mask[0, L - 5:] = 0  # one padded row
    labels[0, L - 5:] = -100
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_gpt_same_losses_from_the_same_weights(tmp_path, preset):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**gpt_config(preset))).eval()
    ours.to_hf(tmp_path)
    train, val = blocks(16, 1), blocks(6, 2)
    order = np.random.default_rng(3).permutation(16)
    result = train_reference("gpt", gpt_config(preset), train, val, steps=3, batch_size=B, order=order,
                             init_dir=tmp_path, eval_batch_size=4, **OPTIM)

    assert result["n_params"] == ours.num_parameters()
    with torch.no_grad():
        # Step s trains on blocks order[s*B:(s+1)*B]; at lr 1e-12 every step sees the initial weights.
        want = [float(ours(ids, labels=ids).loss)
                for ids in (torch.from_numpy(train[order[s * B:(s + 1) * B]]) for s in range(3))]
        ids = torch.from_numpy(val)
        want_val = float(ours(ids, labels=ids).loss)  # all blocks one length: the token mean
    np.testing.assert_allclose(result["train_losses"], want, rtol=1e-5)
    assert result["train_losses"][0] != pytest.approx(result["train_losses"][1], rel=1e-3)  # distinct batches
    assert result["val_loss"] == pytest.approx(want_val, rel=1e-5)  # eval_batch_size 4: 6 = 4 + 2
    assert result["train_seconds"] > 0
    assert result["tokens_per_s"] == pytest.approx(3 * B * L / result["train_seconds"])
    assert result["torch_threads"] == torch.get_num_threads()


def test_gpt_trains_from_its_own_init():
    threads = torch.get_num_threads()
    result = train_reference("gpt", gpt_config(), blocks(32, 4), blocks(4, 5), steps=5, batch_size=B,
                             lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0, seed=0)
    assert len(result["train_losses"]) == 5 and np.isfinite(result["train_losses"]).all()
    assert np.isfinite(result["val_loss"]) and result["tokens_per_s"] > 0
    torch.manual_seed(0)
    assert result["n_params"] == GPT(GPTConfig(**gpt_config())).num_parameters()
    assert torch.get_num_threads() == threads
    # transformers' GPT-2 initialisation: loss near ln(vocab) on random tokens.
    assert abs(result["train_losses"][0] - np.log(VOCAB)) < 0.3


def test_bert_same_losses_from_the_same_weights(tmp_path):
    torch.manual_seed(0)
    ours = BertForMaskedLM(BertConfig(**bert_config())).eval()
    ours.to_hf(tmp_path)
    train = [mlm_batch(10 + s) for s in range(3)]
    val = [mlm_batch(20, rows=3), mlm_batch(21, rows=2)]
    result = train_reference("bert", bert_config(), None, None, steps=3, batch_size=B, mlm_batches=train,
                             mlm_val_batches=val, init_dir=tmp_path, eval_batch_size=2, **OPTIM)

    assert result["n_params"] == ours.num_parameters()
    with torch.no_grad():
        want = [float(ours(**b).loss) for b in train]
        total = sum(float(ours(**b).loss) * int((b["labels"] != -100).sum()) for b in val)
        want_val = total / sum(int((b["labels"] != -100).sum()) for b in val)
    np.testing.assert_allclose(result["train_losses"], want, rtol=1e-5)
    assert result["val_loss"] == pytest.approx(want_val, rel=1e-5)


def test_reference_model_architectures():
    assert type(build_reference_model("gpt", gpt_config())).__name__ == "GPT2LMHeadModel"
    assert type(build_reference_model("gpt", gpt_config("llama-tiny"))).__name__ == "LlamaForCausalLM"
    assert type(build_reference_model("bert", bert_config())).__name__ == "BertForMaskedLM"
    hf = build_reference_model("gpt", dataclasses.asdict(GPTConfig.preset("gpt-tiny", dropout=0.1)))
    assert (hf.config.resid_pdrop, hf.config.embd_pdrop, hf.config.attn_pdrop) == (0.1, 0.1, 0.1)
    assert hf.config.n_positions == 256 and hf.config.n_layer == 2 and hf.config.n_embd == 64


def test_bad_input():
    common = dict(steps=2, batch_size=B, **OPTIM)
    train, val = blocks(8, 0), blocks(2, 1)
    with pytest.raises(ValueError, match="family"):
        train_reference("t5", gpt_config(), train, val, **common)
    with pytest.raises(ValueError, match="no fields"):
        train_reference("gpt", {**gpt_config(), "n_layers": 2}, train, val, **common)
    with pytest.raises(ValueError, match="order has 3 entries"):
        train_reference("gpt", gpt_config(), train, val, order=np.arange(3), **common)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_reference("gpt", gpt_config(), train + VOCAB, val, **common)
    with pytest.raises(ValueError, match="block_size"):
        train_reference("gpt", gpt_config(), np.zeros((8, L + 1), dtype=np.int64), val, **common)
    with pytest.raises(ValueError, match="mlm_batches"):
        train_reference("bert", bert_config(), None, None, **common)
    with pytest.raises(ValueError, match="2 steps"):
        train_reference("bert", bert_config(), None, None, mlm_batches=[mlm_batch(0)],
                        mlm_val_batches=[mlm_batch(1)], **common)
    with pytest.raises(ValueError, match=r"\(4, seq_len\)"):
        train_reference("bert", bert_config(), None, None, mlm_batches=[mlm_batch(0), mlm_batch(1, rows=3)],
                        mlm_val_batches=[mlm_batch(1)], **common)


def test_pretrain_bench_report_writes_table_json_and_plot(tmp_path):
    """The report of `llmkit bench pretrain` from a result dict (the runs themselves take minutes)."""
    from llmkit.bench.harness import report_run_result
    from llmkit.bench.pretrain import format_table, write_plot

    contenders = [dict(contender="llmkit", tokens_per_s=1300.0, runs_tokens_per_s=[1300.0, 1250.0, 1400.0],
                       train_seconds=300.0, val_loss=5.90, train_losses=[9.0, 7.0, 6.0], n_params=123),
                  dict(contender="transformers Trainer", tokens_per_s=1000.0, runs_tokens_per_s=[1000.0] * 3,
                       train_seconds=400.0, val_loss=5.95, train_losses=[9.0, 7.2, 6.1], n_params=123)]
    result = dict(created="2026-11-26T20:00:00", shape=dict(preset="gpt-tiny", vocab_size=512, steps=3,
                                                            batch_size=2, seq_len=8),
                  torch_threads=2, corpus=dict(val_blocks=4), contenders=contenders, wall_s=1.0,
                  verdicts=["llmkit: 1.30x transformers' tokens/s (target >= 1.2x: met)"])
    table = format_table(result)
    assert "1.30x" in table and "1,250" in table and "5.9000" in table
    written = report_run_result("pretrain", result, tmp_path, "Some Host", format_table, write_plot)
    assert written["json"].name == "pretrain-some-host-20261126-200000.json"
    assert written["png"].read_bytes()[:4] == b"\x89PNG"
