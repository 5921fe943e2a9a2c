"""`llmkit word2vec|glove train|eval|bias`: the flags every command shares (-o/--output with
--out kept, --device) and user mistakes as exceptions that say what was wrong (the `llmkit`
command prints them as one line, exit status 2, no traceback); no progress bar when stderr
is not a terminal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmkit.embeddings import KeyedVectors


def run_cli(argv):
    from llmkit import cli

    args = cli.build_parser().parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = [f"w{i}" for i in range(30)]
    path.write_text("\n".join(" ".join(rng.choice(words, 9)) for _ in range(300)) + "\n", encoding="utf-8")
    return path


TRAIN = ["--min-count", "1", "--vector-size", "6", "--epochs", "1", "--workers", "1"]


@pytest.mark.parametrize("flag", ["-o", "--output", "--out"])
def test_output_flag_and_its_old_spelling(corpus, tmp_path, flag, capsys):
    out = tmp_path / "v.txt"
    assert run_cli(["word2vec", "train", "--corpus", str(corpus), flag, str(out), *TRAIN]) == 0
    assert json.loads(capsys.readouterr().out)["vectors"] == str(out)
    assert len(KeyedVectors.load_word2vec_format(out)) == 30


def test_train_errors_before_training(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus .*missing.txt does not exist"):
        run_cli(["word2vec", "train", "--corpus", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "v.txt")])
    with pytest.raises(FileNotFoundError, match="directory .*nowhere does not exist"):
        run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", str(tmp_path / "nowhere" / "v.txt")])
    with pytest.raises(FileNotFoundError, match="model file"):
        run_cli(["glove", "train", "--corpus", str(corpus), "-o", str(tmp_path / "v.txt"),
                 "--model", str(tmp_path / "nowhere" / "g.model")])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", str(tmp_path)])
    assert os.listdir(tmp_path) == []  # nothing written by the refused runs
    with pytest.raises(ValueError, match="sg must be 0 .CBOW. or 1"):
        run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", str(tmp_path / "v.txt"), "--sg", "2"])
    with pytest.raises(ValueError, match="vector_size must be a positive int"):
        run_cli(["glove", "train", "--corpus", str(corpus), "-o", str(tmp_path / "v.txt"), "--vector-size", "0"])
    with pytest.raises(SystemExit):  # argparse: not an int
        run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", str(tmp_path / "v.txt"), "--window", "x"])


@pytest.mark.filterwarnings("ignore:.*duplicate word")  # text read as binary: garbage words, then an error
def test_vectors_file_errors(corpus, tmp_path):
    text, binary = tmp_path / "v.txt", tmp_path / "v.bin"
    assert run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", str(text), *TRAIN]) == 0
    KeyedVectors.load_word2vec_format(text).save_word2vec_format(binary, binary=True)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("w1\tw2\t3\nw3\tw4\t1\nw5\tw6\t2\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="vectors file .*missing.bin does not exist"):
        run_cli(["word2vec", "eval", str(tmp_path / "missing.bin"), "--pairs", str(pairs)])
    with pytest.raises(ValueError, match="is a directory"):
        run_cli(["embeddings", "bias", str(tmp_path)])
    with pytest.raises(ValueError, match="as word2vec text vectors .*pass --binary"):
        run_cli(["word2vec", "eval", str(binary), "--pairs", str(pairs)])
    with pytest.raises(ValueError, match="as word2vec binary vectors .*drop --binary"):
        run_cli(["word2vec", "eval", str(text), "--binary", "--pairs", str(pairs)])
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        run_cli(["embeddings", "bias", str(garbage)])
    with pytest.raises(FileNotFoundError, match="word-pair file"):
        run_cli(["glove", "eval", str(text), "--pairs", str(tmp_path / "nope.tsv")])
    with pytest.raises(ValueError, match="-n must be >= 0"):
        run_cli(["embeddings", "bias", str(text), "-n", "-1"])
    from llmkit import cli

    args = cli.build_parser().parse_args(["word2vec", "eval", str(text), "--pairs", str(pairs), "--device", "cpu"])
    args.device = "cuda"  # what --device cuda parses to on a machine with a GPU
    with pytest.raises(ValueError, match="CPU only"):
        args.handler(args)


# Two `llmkit` commands in one fresh interpreter (importing torch twice would double this test's time):
# the status of each and a separator go to stderr.
TWO_COMMANDS = """
import sys
from llmkit.cli import main
first, second = sys.argv[1:4], sys.argv[4:]
for argv in (first, second):
    status = main(argv)
    print(f"==== status {status}", file=sys.stderr, flush=True)
"""


def test_command_line_prints_one_line_and_no_progress_bar_off_a_terminal(corpus, tmp_path):
    out = tmp_path / "v.txt"
    run = subprocess.run([sys.executable, "-c", TWO_COMMANDS, "word2vec", "eval", str(tmp_path / "missing.bin"),
                          "word2vec", "train", "--corpus", str(corpus), "-o", str(out), *TRAIN],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "LLMKIT_PROGRESS": ""})
    assert run.returncode == 0, run.stderr
    # stderr: the first command's output, "==== status 2", the second's output, "==== status 0"
    missing, trained, last = run.stderr.split("==== status ")
    assert "Traceback" not in run.stderr and trained.startswith("2\n")  # a user error: exit status 2
    assert missing.strip().splitlines() == [f"llmkit word2vec: error: vectors file {tmp_path / 'missing.bin'} "
                                            "does not exist"]
    assert last.startswith("0")
    assert json.loads(run.stdout)["vocabulary"] == 30
    assert "%|" not in trained  # stderr is a pipe: no progress bar
    assert "word2vec vocabulary: 30 words" in trained  # library messages through logging


def test_progress_bar_only_when_asked_or_on_a_terminal(corpus, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "v.txt")
    assert run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", out, *TRAIN]) == 0
    assert "%|" not in capsys.readouterr().err  # pytest's stderr is not a terminal
    monkeypatch.setenv("LLMKIT_PROGRESS", "1")
    assert run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", out, *TRAIN]) == 0
    assert "word2vec: 100%" in capsys.readouterr().err
    assert run_cli(["glove", "train", "--corpus", str(corpus), "-o", out, *TRAIN]) == 0
    err = capsys.readouterr().err
    assert "glove counts: 100%" in err and "glove: 100%" in err
