"""The pretraining loop: schedule, parameter groups, exact gradient
accumulation, checkpoints (atomic, exact resume, refusal of another model),
torchrun DDP / FSDP2 equivalence, and the `llmkit pretrain` command."""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.data import iter_documents, tokenize_corpus, train_tokenizer
from llmkit.models.bert import BertConfig, BertForMaskedLM
from llmkit.models.gpt import GPT, GPTConfig
from llmkit.objectives import get_objective
from llmkit.train import SampleOrder, TrainConfig, Trainer, WarmupCosine, param_groups
from llmkit.train import checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    docs = list(itertools.islice(iter_documents(None), 600))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt_corpus(tiny_text, tmp_path_factory):
    tok = train_tokenizer(tiny_text, vocab_size=384, kind="bpe", progress=False)
    return tokenize_corpus(tiny_text, tok, tmp_path_factory.mktemp("gpt") / "corpus", val_fraction=0.05,
                           progress=False)


@pytest.fixture(scope="module")
def bert_corpus(tiny_text, tmp_path_factory):
    tok = train_tokenizer(tiny_text, vocab_size=384, kind="wordpiece", progress=False)
    return tokenize_corpus(tiny_text, tok, tmp_path_factory.mktemp("bert") / "corpus", val_fraction=0.05,
                           progress=False)


def _gpt(corpus, seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig.preset("gpt-tiny", **{"vocab_size": corpus.tokenizer.vocab_size, "block_size": 64,
                                             "dropout": 0.0, **overrides})
    return GPT(config)


def _bert(corpus, seed=0):
    torch.manual_seed(seed)
    config = BertConfig.from_preset("bert-tiny", vocab_size=corpus.tokenizer.vocab_size, hidden_size=64,
                               intermediate_size=128, max_position_embeddings=64,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config)


def _config(tmp_path, **kw):
    values = dict(out_dir=str(tmp_path), steps=4, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=1,
                  eval_every=0, eval_samples=16, progress=False, seed=3)
    values.update(kw)
    return TrainConfig(**values)


def _losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


# ------------------------------------------------------------ pieces --
def test_warmup_cosine_schedule():
    s = WarmupCosine(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.5 * 0.9)  # half way down the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(GPTConfig.preset("gpt-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") for n in decayed)
    assert not any("ln_" in n or "wte" in n or "wpe" in n or n.endswith("bias") for n in decayed)
    assert "transformer.h.0.attn.c_attn.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sample_order_is_a_permutation_per_epoch_and_reproducible():
    order = SampleOrder(10, seed=5)
    first = [order(p) for p in range(30)]
    assert [e for e, _ in first] == [0] * 10 + [1] * 10 + [2] * 10
    for epoch in range(3):
        assert sorted(i for e, i in first if e == epoch) == list(range(10))
    assert [i for _, i in first[:10]] != [i for _, i in first[10:20]]
    assert first == [SampleOrder(10, seed=5)(p) for p in range(30)]


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(batch_size=10, micro_batch_size=4).grad_accum(1)
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"stepz": 3})


# ------------------------------------------------------------- loop --
def test_gradient_accumulation_equals_full_batch_mlm(bert_corpus, tmp_path):
    """MLM's masked-token count differs between micro-batches: the loss is
    normalised by the global count, so 4 x 2 accumulates to exactly 1 x 8."""
    results = []
    for micro in (8, 2):
        objective = get_objective("mlm", bert_corpus.tokenizer, seed=1)
        config = _config(tmp_path / f"m{micro}", micro_batch_size=micro, steps=3)
        trainer = Trainer(_bert(bert_corpus), objective, bert_corpus.train, config, eval_data=bert_corpus.val)
        trainer.train()
        results.append((_losses(tmp_path / f"m{micro}"), trainer.model.state_dict()))
    (full, w_full), (accum, w_accum) = results
    assert list(full) == [1, 2, 3]
    for step in full:
        assert accum[step] == pytest.approx(full[step], rel=1e-5)
    for name in w_full:
        # Adam: sign-like steps on ~0 grads
        torch.testing.assert_close(w_accum[name], w_full[name], rtol=1e-4, atol=3e-5)


def test_clm_training_learns_and_writes_metrics_and_plot(gpt_corpus, tmp_path):
    objective = get_objective("clm", gpt_corpus.tokenizer)
    config = _config(tmp_path, steps=30, eval_every=15, lr=5e-3, warmup_steps=3)
    result = Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, config, eval_data=gpt_corpus.val).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [15, 30]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # from ~ln(384) = 5.95 down
    assert val[-1]["ppl"] == pytest.approx(math.exp(val[-1]["loss_clm"]))
    assert train[-1]["tokens"] == 8 * 32 and train[-1]["tokens_per_s"] > 0
    assert result["val"]["loss"] == val[-1]["loss"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000030"


def test_mlm_reports_accuracy(bert_corpus, tmp_path):
    objective = get_objective("mlm", bert_corpus.tokenizer)
    config = _config(tmp_path, steps=2, eval_every=2)
    result = Trainer(_bert(bert_corpus), objective, bert_corpus.train, config, eval_data=bert_corpus.val).train()
    assert 0.0 <= result["val"]["accuracy_mlm"] <= 1.0
    assert result["val"]["ppl"] == pytest.approx(math.exp(result["val"]["loss_mlm"]))


class _Interrupt(Exception):
    pass


def test_resume_repeats_the_uninterrupted_run_exactly(gpt_corpus, tmp_path, monkeypatch):
    objective = get_objective("clm", gpt_corpus.tokenizer)
    straight = _config(tmp_path / "straight", steps=6, save_every=3, deterministic=True)
    Trainer(_gpt(gpt_corpus, dropout=0.1), objective, gpt_corpus.train, straight).train()
    expected = _losses(tmp_path / "straight")

    stopped = _config(tmp_path / "stopped", steps=6, save_every=3, deterministic=True)
    trainer = Trainer(_gpt(gpt_corpus, dropout=0.1), objective, gpt_corpus.train, stopped)
    real_step = trainer.train_step

    def dies_at_step_5():
        if trainer.step == 4:
            raise _Interrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", dies_at_step_5)
    with pytest.raises(_Interrupt):
        trainer.train()
    assert sorted(_losses(tmp_path / "stopped")) == [1, 2, 3, 4]
    # A new process would build everything again: a fresh model with other initial weights.
    resumed = Trainer(_gpt(gpt_corpus, seed=99, dropout=0.1), objective, gpt_corpus.train, stopped)
    resumed.train(resume=True)
    assert _losses(tmp_path / "stopped") == expected  # bit for bit, steps 1..6 once each


def test_resume_refuses_another_model_or_missing_checkpoint(gpt_corpus, tmp_path):
    objective = get_objective("clm", gpt_corpus.tokenizer)
    config = _config(tmp_path, steps=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, config).train(resume=True)
    Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, config).train()
    other = _gpt(gpt_corpus, n_layer=3)
    with pytest.raises(checkpoint.CheckpointError, match="another model.*n_layer"):
        Trainer(other, objective, gpt_corpus.train, _config(tmp_path, steps=2)).train(resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="batch_size"):
        Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, _config(tmp_path, steps=2, batch_size=4)).train(
            resume=True)


def test_a_failed_save_leaves_the_previous_checkpoint(gpt_corpus, tmp_path, monkeypatch):
    objective = get_objective("clm", gpt_corpus.tokenizer)
    trainer = Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, _config(tmp_path, steps=2, save_every=1))
    trainer.train()
    before = checkpoint.latest(tmp_path / "checkpoints")
    assert before.name == "step-000002"

    def broken_write(path, value):  # dies after the tensors, before trainer.json
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", broken_write)
    trainer.step = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert checkpoint.latest(tmp_path / "checkpoints") == before
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary directory left behind
    assert checkpoint.load(before)["meta"]["step"] == 2


_KILL_CHILD = r"""
import sys, torch
from pathlib import Path
from llmkit.train import checkpoint
out = Path(sys.argv[1])
base = torch.randn(2_000_000, generator=torch.Generator().manual_seed(7))
step = 0
while True:
    step += 1
    checkpoint.save(out, step, {"w": base + step}, {"state": {}, "param_groups": []},
                    [{"torch": torch.get_rng_state()}], {"meta": step})
    print(step, flush=True)
"""


def test_sigkill_during_saves_never_corrupts_the_latest_checkpoint(tmp_path):
    """A real kill -9 at an arbitrary moment of a loop of saves: `latest`
    always names a complete checkpoint whose weights match its step."""
    for delay in (0.9, 1.7):
        out = tmp_path / f"run{delay}"
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(out)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "1"  # one checkpoint is complete
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        latest = checkpoint.latest(out)
        state = checkpoint.load(latest)
        step = state["meta"]["step"]
        assert latest.name == f"step-{step:06d}"
        base = torch.randn(2_000_000, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(state["model"]["w"], base + step, rtol=0, atol=0)  # every byte of that step


# ------------------------------------------------------- distributed --
def _run_pretrain(args, env_extra=None, torchrun=0, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(env_extra or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "llmkit", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "llmkit", "pretrain", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one_process(bert_corpus, tmp_path, mode):
    """gloo, 2 CPU processes x 2 micro-batches of 2 vs 1 process with the same
    global batch of 8: the same losses step by step (MLM: uneven counts)."""
    common = ["--model", "bert-tiny", "--data", str(bert_corpus.path), "--steps", "3", "--batch-size", "8",
              "--seq-len", "32", "--eval-samples", "8", "--lr", "3e-3", "--warmup-steps", "1",
              "--no-progress", "--threads", "1", "--model-config", "hidden_dropout_prob=0",
              "--model-config", "attention_probs_dropout_prob=0"]  # dropout streams are per rank
    _run_pretrain(common + ["--out-dir", str(tmp_path / "single"), "--micro-batch-size", "8"])
    _run_pretrain(common + ["--out-dir", str(tmp_path / mode), "--micro-batch-size", "2", "--distributed", mode],
                  torchrun=2)
    single, parallel = _losses(tmp_path / "single"), _losses(tmp_path / mode)
    assert list(single) == [1, 2, 3]
    for step in single:
        assert parallel[step] == pytest.approx(single[step], rel=2e-5), (step, single, parallel)


# --------------------------------------------------------------- CLI --
def test_cli_pretrain_end_to_end_and_resume(tiny_text, tmp_path):
    out = tmp_path / "run"
    cache = {"LLMKIT_CACHE": str(tmp_path / "cache")}
    args = ["--model", "gpt-tiny", "--data", str(tiny_text), "--steps", "4", "--batch-size", "4",
            "--seq-len", "32", "--vocab-size", "320", "--out-dir", str(out), "--no-progress",
            "--eval-every", "2", "--save-every", "2", "--sample", "The ship"]
    proc = _run_pretrain(args, cache)
    assert "validation loss" in proc.stdout and "'The ship' -> 'The ship" in proc.stdout
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    model = GPT.from_hf(out / "model")
    assert model.config.vocab_size == 320
    proc = _run_pretrain(args[:5] + ["6"] + args[6:] + ["--resume"], cache)
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_cli_bad_input_gives_clear_errors(tmp_path):
    env = dict(os.environ, LLMKIT_CACHE=str(tmp_path / "cache"))

    def fails(*args):
        proc = subprocess.run([sys.executable, "-m", "llmkit", "pretrain", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stderr

    assert "no data at" in fails("--model", "gpt-tiny", "--data", str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert "empty" in fails("--model", "gpt-tiny", "--data", str(empty))
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    assert "vocab" in fails("--model", "bert-tiny", "--data", str(text), "--vocab-size", "3")
    assert "unknown model preset" in fails("--model", "gpt-7", "--data", str(text))
    assert "objective 'mlm'" in fails("--model", "gpt-tiny", "--objective", "mlm", "--data", str(text))


# ------------------------------------------------- other families, options --
def test_span_corruption_trains_t5_and_nsp_trains_bert_pretraining(tiny_text, tmp_path):
    from llmkit.models.bert import BertForPreTraining
    from llmkit.models.t5 import T5, T5Config

    tok = train_tokenizer(tiny_text, vocab_size=420, kind="bpe", sentinels=20, progress=False)
    corpus = tokenize_corpus(tiny_text, tok, tmp_path / "t5corpus", val_fraction=0.05, progress=False)
    torch.manual_seed(0)
    t5 = T5(T5Config.from_preset("t5-tiny", vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                            dropout_rate=0.0))
    result = Trainer(t5, get_objective("span", tok), corpus.train, _config(tmp_path / "t5", steps=3, eval_every=3),
                     eval_data=corpus.val).train()
    assert set(result["train"]) >= {"loss_span", "ppl"} and math.isfinite(result["val"]["loss"])

    wp = train_tokenizer(tiny_text, vocab_size=400, kind="wordpiece", progress=False)
    corpus = tokenize_corpus(tiny_text, wp, tmp_path / "nspcorpus", val_fraction=0.05, progress=False)
    bert = BertForPreTraining(BertConfig.from_preset("bert-tiny", vocab_size=wp.vocab_size, hidden_size=64,
                                                     intermediate_size=128, max_position_embeddings=64))
    result = Trainer(bert, get_objective("mlm", wp, nsp=True), corpus.train,
                     _config(tmp_path / "nsp", steps=3, eval_every=3), eval_data=corpus.val).train()
    train = result["train"]
    assert train["loss"] == pytest.approx(train["loss_mlm"] + train["loss_nsp"])
    assert 0 <= result["val"]["accuracy_nsp"] <= 1


def test_checkpointing_and_bf16_options(gpt_corpus, tmp_path):
    objective = get_objective("clm", gpt_corpus.tokenizer)
    Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, _config(tmp_path / "a", steps=3)).train()
    recompute = Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train,
                        _config(tmp_path / "b", steps=3, gradient_checkpointing=True))
    assert recompute.model.gradient_checkpointing
    recompute.train()
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), rel=1e-5)
    bf16 = Trainer(_gpt(gpt_corpus), objective, gpt_corpus.train, _config(tmp_path / "c", steps=3, dtype="bf16"))
    bf16.train()
    assert _losses(tmp_path / "c") == pytest.approx(_losses(tmp_path / "a"), abs=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # autocast: fp32 master weights


def test_cli_corpus_prepare_then_pretrain_reads_it(tiny_text, tmp_path):
    env = dict(os.environ, LLMKIT_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "llmkit", "corpus", "prepare", str(tiny_text), "--out", str(out),
                           "--kind", "wordpiece", "--vocab-size", "300", "--val-fraction", "0.05"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "llmkit", "corpus", "info", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert "train:" in proc.stdout and "[MASK]" in proc.stdout
    _run_pretrain(["--model", "bert-tiny", "--data", str(out), "--steps", "2", "--batch-size", "4", "--seq-len",
                   "32", "--out-dir", str(tmp_path / "run"), "--no-progress", "--sample", "the [MASK] sailed."], env)
    assert not (tmp_path / "cache").exists()  # a prepared corpus is read as is


def test_config_file_with_flags_overriding(tmp_path):
    from llmkit.cli import build_parser
    from llmkit.train.cli import options_from_args

    config = tmp_path / "run.toml"
    config.write_text('model = "gpt-tiny"\nsteps = 50\nlr = 3e-4\nbetas = [0.9, 0.98]\nmasking = "static"\n'
                      'model_config = { n_layer = 3 }\n')
    args = build_parser().parse_args(["pretrain", "--config", str(config), "--steps", "7", "--dtype", "bf16"])
    run, train = options_from_args(args)
    assert run["model"] == "gpt-tiny" and run["masking"] == "static" and run["model_config"] == {"n_layer": 3}
    assert (train.steps, train.lr, train.betas, train.dtype) == (7, 3e-4, (0.9, 0.98), "bf16")
    config.write_text('model = "gpt-tiny"\nstepz = 5\n')
    with pytest.raises(ValueError, match="unknown options.*stepz"):
        options_from_args(build_parser().parse_args(["pretrain", "--config", str(config)]))


def test_a_validation_split_too_small_for_the_objective_turns_evaluation_off(bert_corpus, tmp_path, caplog):
    from llmkit.data import TokenShards
    from llmkit.models.bert import BertForPreTraining

    tiny_val = TokenShards.from_documents([bert_corpus.val.document(0)[:20]], bert_corpus.tokenizer.vocab_size)
    torch.manual_seed(0)
    bert = BertForPreTraining(BertConfig.from_preset("bert-tiny", vocab_size=bert_corpus.tokenizer.vocab_size,
                                                     hidden_size=64, intermediate_size=128,
                                                     max_position_embeddings=64))
    with caplog.at_level("WARNING", logger="llmkit"):
        trainer = Trainer(bert, get_objective("mlm", bert_corpus.tokenizer, nsp=True), bert_corpus.train,
                          _config(tmp_path, steps=1, eval_every=1), eval_data=tiny_val)
    assert any("no evaluation" in r.getMessage() for r in caplog.records)
    result = trainer.train()
    assert result["val"] is None and math.isfinite(result["train"]["loss"])
