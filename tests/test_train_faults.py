"""Faults of the data and training pipeline, each a case of issue 17's report.

- A huge vocab_size is a ValueError, never the tokenizers trainer's abort (probed in a subprocess).
- Folders with a symlink loop or two links to one file are read once per real file.
- kill -9 at random moments while the tokenizer and corpus caches are written: every entry left
  behind is complete, and the next run succeeds (and removes the killed build's temporaries).
- Damaged cache entries (old or hand-broken) are rebuilt with a warning, not failed on forever.
- --resume falls back past a truncated / corrupt newest checkpoint to the newest complete one.
- A torn last line of metrics.jsonl is dropped on resume.
- `llmkit pretrain` refuses an output directory holding a previous run unless --resume / --overwrite;
  -o/--output and --out-dir, `llmkit corpus prepare -o/--out`; bad input is a one-line error.
- Saved files get the umask's permissions, not mkstemp's 0600 / 0700.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.data import TokenizedCorpus, iter_documents, prepare_corpus, tokenize_corpus, train_tokenizer
from llmkit.data.sources import source_files, source_identity
from llmkit.data.tokenizer import MAX_VOCAB_SIZE
from llmkit.models.gpt import GPT, GPTConfig
from llmkit.objectives import get_objective
from llmkit.train import TrainConfig, Trainer, checkpoint
from llmkit.train.pipeline import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    docs = list(itertools.islice(iter_documents(None), 300))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(text_file, tmp_path_factory):
    tok = train_tokenizer(text_file, vocab_size=300, progress=False)
    return tokenize_corpus(text_file, tok, tmp_path_factory.mktemp("c") / "corpus", val_fraction=0.05,
                           progress=False)


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


# ----------------------------------------------------------------- vocab_size --
_HUGE_VOCAB_CHILD = r"""
import sys
from llmkit.cli import main
from llmkit.data import train_tokenizer
try:
    train_tokenizer(sys.argv[1], vocab_size=10**9, progress=False)
except ValueError as err:
    print("library:", err)
print("corpus rc", main(["corpus", "prepare", sys.argv[1], "-o", sys.argv[2], "--vocab-size", "1000000000"]))
print("pretrain rc", main(["pretrain", "--model", "gpt-tiny", "--data", sys.argv[1], "-o", sys.argv[2],
                           "--vocab-size", "1000000000"]))
"""


def test_huge_vocab_size_is_a_value_error_not_an_abort(text_file, tmp_path):
    """vocab_size=1e9 made the tokenizers trainer abort the process allocating ~95 GB; now each
    entry point refuses it first. In a subprocess: an abort would show as a negative return code."""
    proc = subprocess.run([sys.executable, "-c", _HUGE_VOCAB_CHILD, str(text_file), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=_env(LLMKIT_CACHE=str(tmp_path / "c")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "library: vocab_size=1,000,000,000 is too large: at most 16,777,216" in proc.stdout
    assert "corpus rc 2" in proc.stdout and "pretrain rc 2" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["llmkit corpus: error: " + proc.stdout.split("library: ")[1].splitlines()[0],
                      "llmkit pretrain: error: " + proc.stdout.split("library: ")[1].splitlines()[0]]
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()  # refused before any work


def test_largest_vocab_size_is_accepted(text_file):
    # The cap itself trains (the vocabulary is what the corpus gives: far fewer entries).
    tok = train_tokenizer(text_file, vocab_size=MAX_VOCAB_SIZE, progress=False, max_documents=20)
    assert 256 < tok.vocab_size < 5000
    with pytest.raises(ValueError, match="too large"):
        train_tokenizer(text_file, vocab_size=MAX_VOCAB_SIZE + 1, progress=False)
    with pytest.raises(ValueError, match="sentinels=.* does not fit"):
        train_tokenizer(text_file, vocab_size=1000, sentinels=10**9, progress=False)


# -------------------------------------------------------------------- symlinks --
def test_symlink_loop_and_duplicate_links_are_read_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha one\n\nalpha two\n")
    (data / "sub" / "b.txt").write_text("beta\n")
    (data / "sub" / "loop").symlink_to("..")             # data/sub/loop -> data: a cycle
    (data / "sub" / "again.txt").symlink_to("../a.txt")  # a second name of a.txt
    (data / "mirror").symlink_to("sub")                   # a second name of the folder sub
    (data / "broken.txt").symlink_to("nowhere.txt")      # skipped, with a warning
    # Each real file once, under the first of its paths in sorted order ("mirror" < "sub").
    assert source_files(data) == [data / "a.txt", data / "mirror" / "b.txt"]
    assert list(iter_documents(data)) == ["alpha one", "alpha two", "beta"]
    assert len(source_identity(data)["files"]) == 2
    # A link named explicitly, or a folder reached through a link, is read.
    assert list(iter_documents(data / "sub" / "again.txt")) == ["alpha one", "alpha two"]
    assert list(iter_documents(data / "sub")) == ["alpha one", "alpha two", "beta"]  # again.txt, b.txt; loop: seen


def test_source_that_is_neither_file_nor_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        source_files("/dev/null")


# --------------------------------------------------------------- cache faults --
_CACHE_CHILD = r"""
import os, sys
from llmkit.data import prepare_corpus
from llmkit.train.pipeline import get_tokenizer
source, cache, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["LLMKIT_CACHE"] = cache
for i in range(first, first + 1000):
    tok = get_tokenizer(source, {"kind": "bpe", "vocab_size": 300 + i, "sentinels": 0}, progress=False)
    prepare_corpus(source, tok, os.path.join(cache, "corpora"), seed=i, shard_tokens=3000, progress=False)
    print(i, flush=True)
"""


def _build(source, cache: Path, i: int):
    """What the child builds at step i, in this process, with LLMKIT_CACHE=cache."""
    old = os.environ.get("LLMKIT_CACHE")
    os.environ["LLMKIT_CACHE"] = str(cache)
    try:
        tok = get_tokenizer(source, {"kind": "bpe", "vocab_size": 300 + i, "sentinels": 0}, progress=False)
        return tok, prepare_corpus(source, tok, cache / "corpora", seed=i, shard_tokens=3000, progress=False)
    finally:
        if old is None:
            del os.environ["LLMKIT_CACHE"]
        else:
            os.environ["LLMKIT_CACHE"] = old


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_sigkill_while_caching_never_poisons_the_cache(text_file, tmp_path, caplog):
    """kill -9 at random moments of a loop that trains tokenizers and tokenizes into the caches
    (a new entry each iteration): every entry present is complete, and the next run goes on."""
    cache = tmp_path / "cache"
    rng = random.Random(17)
    first = 0
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", _CACHE_CHILD, str(text_file), str(cache), str(first)],
                                 stdout=subprocess.PIPE, text=True, env=_env())
        assert child.stdout.readline().strip() == str(first)  # started; one entry pair is complete
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        done = child.stdout.read().split()
        child.wait()
        first = int(done[-1]) + 1 if done else first + 1
        for entry in _entries(cache / "tokenizers"):
            manifest = json.loads((entry / "cache.json").read_text())
            assert set(os.listdir(entry)) == {"cache.json", "tokenizer.json", "tokenizer_config.json"}
            assert manifest["format"] == "llmkit-tokenizer-cache"
        for entry in _entries(cache / "corpora"):
            TokenizedCorpus.open(entry)  # complete: meta.json, shard sizes, offsets, tokenizer hash
    # The iteration that was killed runs to the end, and gives what a clean cache gives.
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        tok, built = _build(text_file, cache, first)
    assert not [r for r in caplog.records if "unusable" in r.getMessage()]  # nothing broken was left to find
    clean_tok, clean = _build(text_file, tmp_path / "clean", first)
    assert tok.backend.to_str() == clean_tok.backend.to_str()
    assert built.train.tokens(0, built.train.n_tokens).tolist() == clean.train.tokens(0, clean.train.n_tokens).tolist()
    leftovers = [p.name for p in (cache / "corpora").iterdir() if ".tmp-" in p.name]
    leftovers += [p.name for p in (cache / "tokenizers").iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # the killed build's temporaries were removed by the one that finished it


def test_damaged_cache_entries_are_rebuilt_with_a_warning(text_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    tok, corpus = _build(text_file, cache, 0)
    (tok_dir,) = _entries(cache / "tokenizers")
    # An entry as an older llmkit's kill left it: tokenizer.json cut short, no manifest.
    text = (tok_dir / "tokenizer.json").read_text()
    (tok_dir / "tokenizer.json").write_text(text[: len(text) // 2])
    (tok_dir / "cache.json").unlink()
    shard = corpus.path / corpus.meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        tok2, corpus2 = _build(text_file, cache, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cached tokenizer" in m and "unusable" in m for m in messages)
    assert any("cached corpus" in m and "unusable" in m and "damaged" in m for m in messages)
    assert tok2.backend.to_str() == tok.backend.to_str()
    assert corpus2.path == corpus.path and corpus2.train.n_tokens == corpus.train.n_tokens
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        _build(text_file, cache, 0)  # now whole again: read, no warning
    assert not caplog.records
    # A file where an entry's directory belongs (hand-made mess) is replaced, not an error forever.
    os.rename(corpus2.path, tmp_path / "aside")
    corpus2.path.write_text("not a corpus")
    assert _build(text_file, cache, 0)[1].train.n_tokens == corpus.train.n_tokens


def test_saved_files_get_the_umask_permissions(text_file, tmp_path):
    old = os.umask(0o022)
    try:
        tok, corpus = _build(text_file, tmp_path / "cache", 0)
        tok.save(tmp_path / "tok")
    finally:
        os.umask(old)
    for root in (tmp_path / "cache", tmp_path / "tok"):
        for path in [root, *root.rglob("*")]:
            if path.name.endswith(".lock"):
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


# ----------------------------------------------------------------- checkpoints --
def _gpt(corpus, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig.preset("gpt-tiny", vocab_size=corpus.tokenizer.vocab_size, block_size=32, n_layer=1,
                              n_embd=32, n_head=2, dropout=0.0)
    return GPT(config)


def _config(out, **kw):
    values = dict(out_dir=str(out), steps=3, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, eval_every=0,
                  eval_samples=0, progress=False, seed=3, save_every=1, keep_checkpoints=3, deterministic=True)
    values.update(kw)
    return TrainConfig(**values)


def _losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """5 uninterrupted steps: the losses a resumed run must repeat."""
    out = tmp_path_factory.mktemp("straight")
    Trainer(_gpt(corpus), get_objective("clm", corpus.tokenizer), corpus.train, _config(out, steps=5)).train()
    return _losses(out)


class _Killed(Exception):
    pass


def _trained(corpus, out, stop_after=3):
    """A 5-step run that dies after step `stop_after` (its checkpoint saved), as a kill would leave it."""
    trainer = Trainer(_gpt(corpus), get_objective("clm", corpus.tokenizer), corpus.train, _config(out, steps=5))
    real_step = trainer.train_step

    def dies():
        if trainer.step == stop_after:
            raise _Killed
        return real_step()

    trainer.train_step = dies
    with pytest.raises(_Killed):
        trainer.train()
    return out / "checkpoints"


@pytest.fixture(scope="module")
def killed_run(corpus, tmp_path_factory) -> Path:
    """A run killed after step 3 (checkpoints 1, 2, 3); tests damage copies of it."""
    out = tmp_path_factory.mktemp("killed")
    _trained(corpus, out)
    return out


def _copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path, dirs_exist_ok=True)
    return tmp_path / "checkpoints"


def _resume(corpus, out, steps=5):
    trainer = Trainer(_gpt(corpus, seed=9), get_objective("clm", corpus.tokenizer), corpus.train,
                      _config(out, steps=steps))
    trainer.train(resume=True)
    return trainer


@pytest.mark.parametrize("damage", ["truncated weights", "corrupt json", "missing file", "garbage header"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(corpus, straight_run, killed_run, tmp_path, caplog,
                                                           damage):
    ckpts = _copy_of(killed_run, tmp_path)
    newest = ckpts / "step-000003"
    assert (ckpts / "latest").read_text().strip() == newest.name
    if damage == "truncated weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "corrupt json":
        (newest / "trainer.json").write_text('{"format": "llmkit-train-checkpoint", "step": 3,')
    elif damage == "missing file":
        (newest / "optimizer.safetensors").unlink()
    else:
        (newest / "rng.safetensors").write_bytes(b"\xff" * 64)
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        assert checkpoint.latest(ckpts) == ckpts / "step-000002"
        trainer = _resume(corpus, tmp_path)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "skipping checkpoint step-000003" in messages and "resuming from step-000002" in messages
    assert trainer.step == 5
    assert _losses(tmp_path) == straight_run  # steps 3..5 trained again from step 2: exactly the straight run
    assert checkpoint.verify(ckpts / "step-000003")["step"] == 3  # the damaged one was replaced by a whole one


def test_resume_with_no_complete_checkpoint_is_a_clear_error(corpus, killed_run, tmp_path):
    ckpts = _copy_of(killed_run, tmp_path)
    for step in ckpts.glob("step-*"):
        (step / "trainer.json").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint under .*step-000003.*trainer.json"):
        _resume(corpus, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="trainer.json is not readable JSON"):
        checkpoint.load(ckpts / "step-000001")


def test_torn_metrics_line_is_dropped_on_resume(corpus, straight_run, killed_run, tmp_path, caplog):
    _copy_of(killed_run, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 4, "lo')  # a kill in the middle of an append
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        _resume(corpus, tmp_path)
    assert any("dropping 1 line" in r.getMessage() for r in caplog.records)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert _losses(tmp_path) == straight_run


def test_train_refuses_a_previous_run_unless_resume_or_overwrite(corpus, killed_run, tmp_path):
    _copy_of(killed_run, tmp_path)
    fresh = Trainer(_gpt(corpus), get_objective("clm", corpus.tokenizer), corpus.train, _config(tmp_path, steps=2))
    with pytest.raises(FileExistsError, match=r"previous run \(checkpoints, metrics.jsonl.*--resume.*--overwrite"):
        fresh.train()
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000003"  # untouched
    with pytest.raises(ValueError, match="give one of them"):
        Trainer(_gpt(corpus), get_objective("clm", corpus.tokenizer), corpus.train,
                _config(tmp_path, steps=2, overwrite=True)).train(resume=True)
    Trainer(_gpt(corpus), get_objective("clm", corpus.tokenizer), corpus.train,
            _config(tmp_path, steps=2, overwrite=True)).train()
    assert sorted(_losses(tmp_path)) == [1, 2]
    # The old run is gone, not mixed in: its step-3 checkpoint would have outranked the new run's step 2.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]


# ------------------------------------------------------------------------- CLI --
def _cli(kind: str, *argv) -> tuple[int, str, str]:
    """`llmkit KIND ARGV...` through the `llmkit` command's main, in this process: (exit code, stdout, stderr)."""
    from llmkit.cli import main

    logger = logging.getLogger("llmkit")
    handlers, level = list(logger.handlers), logger.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([kind, *(str(a) for a in argv)])
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
    finally:  # main configures logging to the stderr of its call: undo that for the next one
        logger.handlers[:] = handlers
        logger.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def _one_line_error(kind, *argv) -> str:
    code, _, err = _cli(kind, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"llmkit {kind}: error: "), (argv, code, err)
    return lines[0]


_TINY = ("--model", "gpt-tiny", "--model-config", "n_layer=1", "--model-config", "n_embd=32", "--model-config",
         "n_head=2", "--vocab-size", "300", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
         "--eval-samples", "0", "--no-progress", "--device", "cpu", "--threads", "1")


def test_cli_pretrain_output_flag_and_previous_run(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        code, stdout, err = _cli("pretrain", *_TINY, "--data", text_file, "-o", out)
        assert code == 0, err
        assert "llmkit pretrain: 1 steps" in stdout and (out / "model" / "config.json").is_file()
        message = _one_line_error("pretrain", *_TINY, "--data", text_file, "--out-dir", out)
        assert "holds a previous run" in message and "--resume" in message and "--overwrite" in message
        assert _cli("pretrain", *_TINY, "--data", text_file, "--out-dir", out, "--steps", "2", "--resume")[0] == 0
        assert sorted(_losses(out)) == [1, 2]
        assert _cli("pretrain", *_TINY, "--data", text_file, "--output", out, "--overwrite")[0] == 0
        assert sorted(_losses(out)) == [1]
        assert "give one of them" in _one_line_error("pretrain", *_TINY, "--data", text_file, "-o", out,
                                                     "--resume", "--overwrite")
    finally:
        torch.set_num_threads(threads)


def test_cli_corpus_prepare_output_flags(text_file, tmp_path):
    code, stdout, err = _cli("corpus", "prepare", text_file, "-o", tmp_path / "a", "--vocab-size", "300",
                             "--max-documents", "50")
    assert code == 0, err
    assert TokenizedCorpus.open(tmp_path / "a").meta["max_documents"] == 50
    assert _cli("corpus", "prepare", text_file, "--out", tmp_path / "b", "--vocab-size", "300",
                "--max-documents", "50")[0] == 0
    assert "already exists" in _one_line_error("corpus", "prepare", text_file, "-o", tmp_path / "a")
    code, stdout, _ = _cli("corpus", "info", tmp_path / "b")
    assert code == 0 and "train:" in stdout


def test_cli_bad_input_is_a_one_line_error(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    t = str(text_file)
    base = ("--model", "gpt-tiny", "--data", t, "-o", str(tmp_path / "run"))
    files = {"unknown.toml": 'model = "gpt-tiny"\nstepz = 3\n', "type.toml": 'model = "gpt-tiny"\nsteps = "ten"\n',
             "broken.toml": "model = [\n", "empty.toml": "", "table.toml": 'model = "gpt-tiny"\nmodel_config = 3\n',
             "empty.txt": "", "binary.txt": None}
    for name, text in files.items():
        if text is None:
            (tmp_path / name).write_bytes(bytes(range(128, 256)))
        else:
            (tmp_path / name).write_text(text)
    (tmp_path / "plain").mkdir()
    cases = [
        (("pretrain", *base, "--steps", "-1"), "steps must be >= 1, got -1"),
        (("pretrain", *base, "--batch-size", "0"), "batch_size must be >= 1"),
        (("pretrain", *base, "--lr", "nan"), "lr must be a finite number, got nan"),
        (("pretrain", *base, "--model-config", "n_layer"), "KEY=VALUE"),
        (("pretrain", *base, "--model-config", "bogus=3"), "gpt-tiny has no field bogus"),
        (("pretrain", *base, "--model-config", "n_layer=abc"), "n_layer must be int"),
        (("pretrain", *base, "--model-config", "n_head=7"), "not divisible"),
        (("pretrain", "--config", tmp_path / "unknown.toml"), "unknown options ['stepz']"),
        (("pretrain", "--config", tmp_path / "type.toml"), "steps must be an int, got 'ten'"),
        (("pretrain", "--config", tmp_path / "broken.toml"), "is not valid TOML"),
        (("pretrain", "--config", tmp_path / "empty.toml"), "--model is required"),
        (("pretrain", "--config", tmp_path / "table.toml"), "model_config must be a table"),
        (("pretrain", "--config", tmp_path / "missing.toml"), "no config file"),
        (("pretrain", "--model", "gpt-tiny", "--data", "/dev/null"), "neither a file nor a folder"),
        (("pretrain", "--model", "gpt-tiny", "--data", tmp_path / "binary.txt"), "not UTF-8"),
        (("pretrain", "--model", "gpt-tiny", "--data", tmp_path / "empty.txt"), "empty corpus"),
        (("pretrain", "--model", "gpt-tiny", "--data", tmp_path / "plain"), "holds no readable files"),
        (("pretrain", "--model", "gpt-tiny", "--data", tmp_path / "missing"), "no data at"),
        (("pretrain", *base, "--vocab-size", "0"), "--vocab-size must be a positive integer"),
        (("pretrain", *base, "--tokenizer", t), "not a valid tokenizer.json"),
        (("pretrain", *base, "--resume"), "no checkpoint under"),
        (("corpus", "info", tmp_path / "plain"), "is not a tokenized corpus"),
        (("corpus", "info", tmp_path / "missing"), "no tokenized corpus"),
        (("corpus", "prepare", t, "-o", t), "exists and is not a directory"),
        (("corpus", "prepare", t, "-o", tmp_path / "c", "--val-fraction", "1.5"), "--val-fraction must be in"),
        (("corpus", "prepare", t, "-o", tmp_path / "c", "--vocab-size", "-5"), "vocab_size must be >= 1"),
        (("corpus", "prepare", tmp_path / "missing", "-o", tmp_path / "c"), "does not exist"),
    ]
    for argv, expected in cases:
        assert expected in _one_line_error(*argv), argv
    # Every refusal came before any tokenizer was trained (binary.txt and empty.txt fail while it reads them).
    assert [p for p in (tmp_path / "cache").glob("*/*") if not p.name.startswith(".")] == []
    code, _, err = _cli("pretrain", *base, "--device", "tpu")  # argparse's own error: usage + one message
    assert code == 2 and "--device must be auto, cpu, cuda or cuda:N" in err


def test_no_mkstemp_or_pyplot_left_in_the_data_and_train_code():
    """Saves go through llmkit.utils (umask permissions, atomic), plots through a Figure of their own."""
    offenders = []
    for folder in ("data", "train", "objectives"):
        for file in (REPO / "python" / "llmkit" / folder).rglob("*.py"):
            text = file.read_text()
            for needle in ("mkstemp", "mkdtemp", "matplotlib.pyplot", "tqdm.auto", "warnings.warn", "print("):
                if needle in text and not (needle == "print(" and file.name == "cli.py"):
                    offenders.append(f"{file.relative_to(REPO)}: {needle}")
    assert offenders == []
