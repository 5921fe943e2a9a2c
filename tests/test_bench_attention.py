"""`llmkit bench attention`: its FLOP counts, and one quick CPU run through the
harness (both contenders timed, FLOP rates, peak memory and linearity notes,
JSON written). Short timing budgets keep it to seconds; the numbers are not
checked, only that they are there and consistent."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def attention():
    import llmkit.bench.attention

    return llmkit.bench.attention


@pytest.fixture(scope="module")
def harness():
    import llmkit.bench.harness

    return llmkit.bench.harness


@pytest.fixture(scope="module")
def quick_result(harness):
    import llmkit.bench

    opts = harness.RunOptions(quick=True, repeats=3, min_repeats=2, budget_s=0.5, warmup_s=0.0,
                              min_sample_s=0.001, devices=("cpu",), progress=False)
    floors = {"cpu": harness.measure_copy_floor("cpu", opts, nbytes=8 << 20)}  # small: the floor is not under test
    return harness.run_benchmark(llmkit.bench.registered()["attention"], opts, floors)


def workload(attention, **overrides):
    base = dict(device="cpu", dtype="fp32", batch=2, seqlen=64, heads=3, head_dim=16, causal=False,
                window=None, step="fwd")
    return attention.Workload(**{**base, **overrides})


# --------------------------------------------------------------------------- FLOP counts


def test_flops_follow_flash_attn(attention):
    full = workload(attention)
    assert full.flops() == 4 * 2 * 64**2 * 3 * 16
    assert workload(attention, causal=True).flops() == full.flops() / 2  # halved, as flash-attn counts
    assert workload(attention, step="bwd").flops() == 2.5 * full.flops()
    assert workload(attention, step="fwd+bwd").flops() == 3.5 * full.flops()


def test_window_flops_count_the_visible_keys(attention):
    for window in ((5, 5), (0, 7), (3, 0), (-1, 4), (100, 100)):
        w = workload(attention, window=window)
        visible = int(attention.window_mask(w.seqlen, window, "cpu").sum())
        assert w.visible_pairs() == visible, window
        assert w.flops() == 4 * 2 * 3 * 16 * visible
    assert workload(attention, window=(-1, -1)).flops() == workload(attention).flops()


# --------------------------------------------------------------------------- a quick run


def test_quick_run_times_both_contenders(quick_result):
    assert quick_result.cases
    for case in quick_result.cases:
        names = [m.contender for m in case.measurements]
        assert names[0] == "llmkit" and len(names) == 2 and names[1].startswith("sdpa"), case.name
        for m in case.measurements:
            assert m.ok and m.median_s > 0 and m.min_s > 0, (case.name, m.contender, m.note)
        assert case.measurements[1].speedup > 0
        # the peer's output matches ours (bf16 rounding at most)
        assert "max |diff| from llmkit" in case.measurements[1].note


def test_quick_run_reports_flop_rates(quick_result):
    steps = {c.params["step"] for c in quick_result.cases}
    dtypes = {c.params["dtype"] for c in quick_result.cases}
    assert steps == {"fwd", "fwd+bwd"} and dtypes == {"fp32", "bf16"}
    for case in quick_result.cases:
        assert case.params["flops"] > 0 and case.bytes_in == int(case.params["flops"])
        for m in case.measurements:  # the "GB/s in" column is GFLOP/s here
            assert m.gbps_in == pytest.approx(case.params["flops"] / m.median_s / 1e9)


def test_window_rows_note_peak_memory_and_linearity(quick_result):
    windows = [c for c in quick_result.cases if c.params["window"]]
    assert windows
    for case in windows:
        memory = case.params["peak_memory_mib"]
        assert set(memory) == {m.contender for m in case.measurements}
        for m in case.measurements:
            assert memory[m.contender]["call_mib"] > 0 and memory[m.contender]["inputs_mib"] > 0
            assert "peak memory: +" in m.note
        assert "dense mask" in case.measurements[1].note
        linearity = case.params["linearity"]
        assert linearity["seqlens"] == [case.params["seqlen"] // 2, case.params["seqlen"]]
        assert linearity["time_ratio"] > 0 and "linearity" in case.measurements[0].note


def test_peak_memory_in_fresh_processes(attention):
    """The full run's method (one fresh process per contender); SDPA's inputs include the dense mask."""
    w = workload(attention, batch=1, seqlen=512, heads=8, head_dim=64, window=(32, 32))
    m = attention.cpu_peak_memory_fresh(w, ["sdpa-mask"])["sdpa-mask"]  # one process: imports cost seconds
    assert "error" not in m, m
    assert m["call_mib"] > 0 and "fresh process" in m["method"]
    qkv_mib, mask_mib = 3 * w.tensor_bytes() / 2**20, 512 * 512 / 2**20
    assert m["inputs_mib"] == pytest.approx(qkv_mib + mask_mib)
    assert attention.call_input_bytes("llmkit", w) / 2**20 == pytest.approx(qkv_mib)


def test_quick_run_writes_json_and_table(harness, quick_result, tmp_path):
    written = harness.save_result(quick_result, tmp_path)
    data = json.loads(written["json"].read_text())
    assert data["benchmark"] == "attention" and len(data["cases"]) == len(quick_result.cases)
    window_case = next(c for c in data["cases"] if c["params"]["window"])
    assert window_case["params"]["peak_memory_mib"]["llmkit"]["call_mib"] > 0
    assert all(r["gbps_in"] > 0 for c in data["cases"] for r in c["measurements"])
    text = written["txt"].read_text()
    assert "GFLOP/s" in text and "peak memory" in text and "sdpa-mask" in text


def test_cuda_cases_only_with_a_gpu(attention, harness):
    opts = harness.RunOptions(quick=True, devices=("cuda",))
    if torch.cuda.is_available():
        pytest.skip("builds CUDA cases (and times a matmul) on a GPU machine")
    assert attention.attention_cases(opts) == []


def test_peak_fractions_divide_by_the_runs_matmul_peak(attention, harness, quick_result):
    case = quick_result.cases[0]
    ours = case.measurements[0]
    peak_tflops = 2 * case.params["flops"] / ours.median_s / 1e12  # ours at half the peak
    with_peak = harness.CaseResult(case.name, "cuda", {**case.params, "matmul_peak": {"tflops": peak_tflops}},
                                   case.bytes_in, case.bytes_moved, case.measurements, [])
    lines = attention.peak_fractions(harness.BenchResult(**{**quick_result.__dict__, "cases": [with_peak]}))
    assert len(lines) == 2 and lines[0].startswith(f"{case.name} llmkit: ") and "50.0% of matmul peak" in lines[0]
    assert attention.peak_fractions(quick_result) == []  # CPU rows have no matmul peak


def test_finish_notes_the_fraction_of_the_matmul_peak(attention, harness, quick_result):
    import copy

    case = copy.deepcopy(quick_result.cases[0])
    ours = case.measurements[0]
    peak_tflops = 4 * case.params["flops"] / ours.median_s / 1e12  # ours at a quarter of the peak
    case.params = {**case.params, "matmul_peak": {"tflops": peak_tflops}}
    result = harness.BenchResult(**{**quick_result.__dict__, "cases": [case]})
    attention.note_peak_fractions(result)
    assert "25.0% of the bf16 matmul peak" in ours.note
    from llmkit.bench import registered

    assert registered()["attention"].finish is attention.note_peak_fractions
