"""The benchmark harness behind `llmkit bench` (timing, ratios, outputs, CLI).

Plain torch / sleep callables stand in for kernels, so these tests run in seconds.
"""
import json
import subprocess
import time
import types

import pytest
import torch

@pytest.fixture(scope="module")
def kit():
    """llmkit.bench, its harness and llmkit.cli."""
    import llmkit.bench
    import llmkit.bench.harness
    import llmkit.cli

    return types.SimpleNamespace(bench=llmkit.bench, harness=llmkit.bench.harness, cli=llmkit.cli)


def sleeper(seconds, log=None, name=None):
    """A contender setup whose timed call sleeps `seconds` (and logs its name)."""

    def setup(_inputs):
        def call():
            if log is not None:
                log.append(name)
            time.sleep(seconds)

        return call

    return setup


def fast_opts(h, **overrides):
    opts = h.RunOptions(repeats=5, min_repeats=3, budget_s=1.0, warmup_s=0.0, min_sample_s=0.0, progress=False)
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


# --------------------------------------------------------------------------- timing logic


def test_median_odd_and_even(kit):
    assert kit.harness.median([5.0, 1.0, 3.0]) == 3.0
    assert kit.harness.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_plan_samples_batches_fast_calls_and_cuts_slow_ones(kit):
    h = kit.harness
    opts = h.RunOptions(repeats=10, min_repeats=3, budget_s=3.0, min_sample_s=0.005)
    calls, repeats = h.plan_samples(1e-4, opts)
    assert calls == 50 and repeats == 10  # 50 x 0.1 ms = one 5 ms sample
    assert h.plan_samples(0.5, opts) == (1, 6)  # 3 s budget / 0.5 s
    assert h.plan_samples(10.0, opts) == (1, 3)  # never below min_repeats


def test_run_case_medians_speedup_and_throughput(kit):
    h = kit.harness
    case = h.Case("sleep", "cpu", bytes_in=1_000_000, bytes_moved=3_000_000, contenders=[
        h.Contender("ours", sleeper(0.002), ours=True),
        h.Contender("peer", sleeper(0.006)),
    ])
    result = h.run_case(case, fast_opts(h), floor_gbps=10.0)
    ours, peer = result.measurements
    for m, slept in ((ours, 0.002), (peer, 0.006)):
        assert len(m.samples_s) == 5 and m.calls_per_sample == 1
        assert slept <= m.min_s <= m.median_s < slept + 0.004
        assert m.gbps_in == pytest.approx(1_000_000 / m.median_s / 1e9)
        assert m.floor_fraction == pytest.approx(3_000_000 / m.median_s / 1e9 / 10.0)
    assert ours.speedup is None
    assert peer.speedup == pytest.approx(peer.median_s / ours.median_s)
    assert 1.8 < peer.speedup < 3.5


def test_samples_are_interleaved_across_contenders(kit):
    h = kit.harness
    log = []
    case = h.Case("order", "cpu", 1, 1, contenders=[
        h.Contender("a", sleeper(0, log, "a"), ours=True),
        h.Contender("b", sleeper(0, log, "b")),
    ])
    h.run_case(case, fast_opts(h, repeats=4))
    assert log[:4] == ["a", "a", "b", "b"]  # two warm-up calls each, before any timing
    assert log[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rounds alternate who goes first


def test_unavailable_and_slow_contenders_are_reported_not_fatal(kit):
    h = kit.harness

    def missing(_inputs):
        raise ImportError("No module named 'peerlib'")

    case = h.Case("mixed", "cpu", 1, 1, contenders=[
        h.Contender("ours", sleeper(0.001), ours=True),
        h.Contender("missing", missing),
        h.Contender("slow", sleeper(0.05)),
    ])
    ours, gone, slow = h.run_case(case, fast_opts(h, max_call_s=0.02)).measurements
    assert ours.ok and len(ours.samples_s) == 5
    assert not gone.ok and gone.note == "unavailable: ImportError: No module named 'peerlib'"
    assert not slow.ok and slow.note.startswith("skipped: one call took")
    assert gone.speedup is None and slow.speedup is None


def test_check_notes_reach_the_rows(kit):
    h = kit.harness
    case = h.Case("checked", "cpu", 1, 1, contenders=[
        h.Contender("ours", lambda _: lambda: torch.ones(3), ours=True),
        h.Contender("peer", lambda _: lambda: torch.zeros(3)),
    ], check=lambda out: {"peer": f"max diff {(out['peer'] - out['ours']).abs().max().item():g}"})
    ours, peer = h.run_case(case, fast_opts(h)).measurements
    assert peer.note == "max diff 1" and ours.note == ""


def test_speedup_is_their_time_over_ours(kit):
    h = kit.harness
    ours = h.Measurement("ours", True, median_s=2.0)
    peer = h.Measurement("peer", False, median_s=6.0)
    faster_peer = h.Measurement("fast", False, median_s=1.0)
    h.add_speedups([ours, peer, faster_peer])
    assert (ours.speedup, peer.speedup, faster_peer.speedup) == (None, 3.0, 0.5)

    lone = h.Measurement("peer", False, median_s=6.0)
    h.add_speedups([h.Measurement("ours", True), lone])  # ours failed: no ratio
    assert lone.speedup is None


# --------------------------------------------------------------------------- outputs


def tiny_benchmark(h):
    n = 1 << 16

    def make_inputs():
        return torch.rand(n)

    def cases(opts):
        return [h.Case(f"sum {n}", "cpu", bytes_in=4 * n, bytes_moved=4 * n + 4, make_inputs=make_inputs,
                       params={"n": n}, contenders=[
                           h.Contender("torch", lambda x: lambda: x.sum(), ours=True),
                           h.Contender("python-loop", lambda x: lambda: sum(x[:2048].tolist())),
                       ])]

    return h.Benchmark("tiny", "a sum", cases)


@pytest.fixture(scope="module")
def tiny_result(kit):
    h = kit.harness
    opts = fast_opts(h, min_sample_s=0.001)
    floors = {"cpu": h.measure_copy_floor("cpu", opts, nbytes=8 << 20)}
    return h.run_benchmark(tiny_benchmark(h), opts, floors)


def test_copy_floor_counts_read_plus_write(kit, tiny_result):
    floor = tiny_result.floors["cpu"]
    assert floor.bytes_moved == 2 * (8 << 20)
    assert floor.gbps == pytest.approx(floor.bytes_moved / floor.median_s / 1e9)
    assert floor.gbps > 0.1


def test_table_says_which_way_the_ratio_goes(kit, tiny_result):
    text = kit.harness.format_table(tiny_result)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    assert "llmkit speedup (their/our time)" in header
    assert "their median time / our median time (> 1: llmkit is faster)" in text
    ours_row = next(line for line in lines if "torch (ours)" in line)
    peer_row = next(line for line in lines if "python-loop" in line)
    speedup = tiny_result.cases[0].measurements[1].speedup
    assert peer_row.endswith(f"{speedup:.2f}x") and not ours_row.endswith("x")
    assert "copy floor (cpu)" in text


def test_save_writes_json_table_and_png(kit, tiny_result, tmp_path):
    written = kit.harness.save_result(tiny_result, tmp_path / "results")
    assert set(written) == {"json", "txt", "png"}
    stem = written["json"].stem
    assert stem.startswith("tiny-") and stem == written["png"].stem == written["txt"].stem

    data = json.loads(written["json"].read_text())
    assert {"cpu", "torch_threads", "torch", "git", "llmkit_build", "hostname"} <= data["machine"].keys()
    assert data["machine"]["torch_threads"] == torch.get_num_threads()
    assert data["floors"]["cpu"]["gbps"] == tiny_result.floors["cpu"].gbps
    rows = data["cases"][0]["measurements"]
    assert [r["contender"] for r in rows] == ["torch", "python-loop"]
    assert len(rows[0]["samples_s"]) == 5 and rows[1]["speedup"] > 0

    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["png"].stat().st_size > 5000  # a real figure, not an empty canvas


def test_no_plot_without_ratios(kit, tiny_result, tmp_path):
    h = kit.harness
    bare = h.BenchResult(**{**tiny_result.__dict__, "cases": []})
    assert h.write_plot(bare, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_device_label_is_file_name_safe(kit, tiny_result):
    label = kit.harness.device_label(tiny_result)
    assert label and all(c.isalnum() or c == "-" for c in label)


def test_default_out_dir_uses_git_root(kit, tmp_path, monkeypatch):
    h = kit.harness
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert h.default_out_dir() == plain / "bench" / "results"

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo / "sub")
    assert h.default_out_dir().resolve() == (repo / "bench" / "results").resolve()


# --------------------------------------------------------------------------- CLI


def test_cli_bench_arguments(kit, tmp_path):
    parser = kit.cli.build_parser()
    args = parser.parse_args(["bench", "nf4", "--quick", "--out", str(tmp_path), "--repeats", "2"])
    assert (args.names, args.quick, args.output, args.repeats) == (["nf4"], True, str(tmp_path), 2)
    assert parser.parse_args(["bench", "nf4", "-o", "x"]).output == "x"
    assert args.handler is kit.cli._bench

    opts = kit.bench.options_from_args(args)
    assert (opts.quick, opts.repeats, opts.min_repeats, opts.budget_s) == (True, 2, 2, 1.0)

    defaults = parser.parse_args(["bench"])
    assert defaults.names == [] and defaults.output is None and not defaults.quick
    assert kit.bench.options_from_args(defaults).repeats == 10
    assert kit.bench.options_from_args(parser.parse_args(["bench", "--device", "cpu"])).devices == ("cpu",)


@pytest.mark.parametrize("argv", [[], ["bench", "--repeats", "0"], ["bench", "--device", "tpu"], ["frobnicate"]])
def test_cli_rejects_bad_arguments(kit, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kit.cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_cli_info_and_demo_subcommands(kit):
    parser = kit.cli.build_parser()
    assert parser.parse_args(["info"]).handler is kit.cli._info
    assert parser.parse_args(["demo"]).handler is kit.cli._demo


def test_unknown_benchmark_lists_the_registered_ones(kit):
    assert "nf4" in kit.bench.registered()
    with pytest.raises(ValueError, match="unknown benchmark.*available: .*nf4"):
        kit.bench.main(["no-such-bench"])


def test_bench_without_names_lists_instead_of_running(kit, capsys):
    assert kit.cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    for name in ("nf4", "attention", "lora", "word2vec", "models", "pretrain"):
        assert f"  {name} " in out
    assert "llmkit bench all" in out
