"""`llmkit bench word2vec`: both trainers run on the same tokenized corpus,
the ratios and verdicts follow from the measured runs, and the files are written."""

import json

import pytest

from llmkit import bench
from llmkit.bench import word2vec as w2v_bench

pytest.importorskip("gensim")


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    monkeypatch.setattr(w2v_bench, "QUICK_WORDS", 60_000)
    args = ["word2vec", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run_from_args(parser.parse_args(args)) == 0
    written = sorted(tmp_path.iterdir())
    return tmp_path, written


def test_word2vec_bench_runs_every_cpu_contender_and_writes_results(tiny_run):
    out_dir, written = tiny_run
    suffixes = sorted(p.suffix for p in written)
    assert suffixes == [".json", ".png", ".txt"]
    result = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    runs = {c["contender"]: c for c in result["contenders"]}
    assert set(runs) == {"llmkit", "llmkit per-pair", "gensim"}
    assert result["hyperparameters"]["epochs"] == 1 and result["hyperparameters"]["sg"] == 1
    for c in runs.values():
        assert len(c["runs"]) == 1, c["note"]
        run = c["runs"][0]
        assert run["words_per_second"] == pytest.approx(result["corpus"]["words"] / run["train_seconds"])
        assert 0.0 <= run["analogy_accuracy"] <= 1.0 and -1.0 <= run["spearman"] <= 1.0
        assert run["vocabulary"] > 1000  # same min_count, same corpus: vocabularies of the same size
    assert runs["llmkit"]["runs"][0]["vocabulary"] == runs["gensim"]["runs"][0]["vocabulary"]
    ratio = runs["llmkit"]["words_per_second"] / runs["gensim"]["words_per_second"]
    assert runs["llmkit"]["speedup_vs_gensim"] == pytest.approx(ratio)
    assert result["verdicts"][0].startswith("--quick")
    assert any(v.startswith("llmkit: ") and "gensim's words/s" in v for v in result["verdicts"])


def test_word2vec_bench_verdicts_apply_the_issue_bounds():
    s = w2v_bench.ContenderSummary
    peer = s("gensim", "cpu", runs=[object()], words_per_second=100.0, analogy_accuracy=0.10, spearman=0.40)
    good = s("llmkit", "cpu", runs=[object()], words_per_second=160.0, analogy_accuracy=0.091, spearman=0.381,
             speedup_vs_gensim=1.6)
    bad = s("slow", "cpu", runs=[object()], words_per_second=140.0, analogy_accuracy=0.089, spearman=0.379,
            speedup_vs_gensim=1.4)
    lines = w2v_bench._verdicts({"gensim": peer, "llmkit": good, "slow": bad}, quick=False)
    assert "MISSED" not in lines[0] and lines[0].count("met") == 3
    assert lines[1].count("MISSED") == 3


def test_word2vec_bench_cuda_verdict_compares_with_our_cpu_trainer():
    s = w2v_bench.ContenderSummary
    peer = s("gensim", "cpu", runs=[object()], words_per_second=1e5, analogy_accuracy=0.10, spearman=0.40)
    cpu = s("llmkit", "cpu", runs=[object()], words_per_second=9e5, analogy_accuracy=0.10, spearman=0.40,
            speedup_vs_gensim=9.0)
    for gpu_wps, verdict in [(12e6, "met"), (8e6, "MISSED")]:
        gpu = s("llmkit cuda", "cuda", runs=[object()], words_per_second=gpu_wps, analogy_accuracy=0.10,
                spearman=0.40, speedup_vs_gensim=gpu_wps / 1e5)
        lines = w2v_bench._verdicts({"gensim": peer, "llmkit": cpu, "llmkit cuda": gpu}, quick=False)
        line = next(v for v in lines if v.startswith("llmkit cuda: ") and "our CPU trainer" in v)
        assert f"{gpu_wps / 9e5:.1f}x our CPU trainer" in line and line.endswith(f"{verdict})")


def test_glove_bench_writes_its_figures(monkeypatch, tmp_path):
    monkeypatch.setattr(w2v_bench, "QUICK_WORDS", 40_000)
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run_from_args(parser.parse_args(["glove", "--quick", "-o", str(tmp_path)])) == 0
    written = sorted(tmp_path.iterdir())
    assert sorted(p.suffix for p in written) == [".json", ".png", ".txt"]
    result = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    runs = {r["x_max"]: r for r in result["contenders"]}
    assert set(runs) == set(w2v_bench.GLOVE_X_MAX) and result["hyperparameters"]["epochs"] == 3
    for r in runs.values():
        assert r["pairs"] > 10_000 and r["vocabulary"] > 100 and r["count_cpp_seconds"] <= r["count_seconds"]
        assert r["seconds_per_epoch"] == pytest.approx(r["train_seconds"] / 3)
        assert 0.0 <= r["analogy_accuracy"] <= 1.0 and -1.0 <= r["spearman"] <= 1.0
    assert runs[100.0]["pairs"] == runs[10.0]["pairs"]  # x_max weighs the pairs, it does not change them
    assert runs[100.0]["final_cost"] != runs[10.0]["final_cost"]
    table = next(p for p in written if p.suffix == ".txt").read_text()
    assert "llmkit GloVe x_max=100" in table and "llmkit GloVe x_max=10 " in table


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(w2v_bench, "optional", lambda name: None)
    result = {"contenders": [{"contender": "llmkit GloVe x_max=10", "analogy_accuracy": 0.1, "spearman": 0.3,
                              "seconds_per_epoch": 1.0}], "corpus": {"words": 1}, "hyperparameters": {"epochs": 1}}
    with caplog.at_level("WARNING", logger="llmkit"):
        assert w2v_bench.write_glove_plot(result, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists() and "matplotlib is not installed" in caplog.text
