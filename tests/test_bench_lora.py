"""`llmkit bench lora` and the nf4_linear cases of `llmkit bench nf4`: the
contenders compute the same thing (checked in the run) and the rows carry
ratios; the per-case time budget."""

import pytest

from llmkit.bench import harness, make_options, registered


def test_a_case_budget_overrides_the_run_budget():
    opts = harness.RunOptions(repeats=10, min_repeats=3, budget_s=3.0, min_sample_s=0.005)
    assert harness.plan_samples(1.0, opts) == (1, 3)
    assert harness.plan_samples(1.0, opts, budget_s=10.0) == (1, 10)


def _quick(**kw):
    opts = make_options(quick=True, device="cpu")
    opts.progress = False
    opts.budget_s, opts.warmup_s, opts.repeats, opts.min_repeats = 0.2, 0.0, 3, 3
    return opts


def test_lora_bench_quick_matches_peft_and_reports_ratios():
    pytest.importorskip("peft")
    bench = registered()["lora"]
    opts = _quick()
    cases = bench.cases(opts)
    assert [c.params["base"] for c in cases] == ["dense", "dense", "nf4"]
    assert [c.params["lora_dropout"] for c in cases] == [0.0, 0.05, 0.0]  # PEFT's names in the results
    assert cases[0].params["r"] == 16 and cases[0].params["lora_alpha"] == 16
    dense = harness.run_case(cases[0], opts)
    rows = {m.contender: m for m in dense.measurements}
    assert set(rows) == {"llmkit", "peft", "frozen layer"} and all(m.ok for m in rows.values())
    assert rows["peft"].speedup is not None
    # Same weights, no dropout: PEFT's output and gradients equal ours to fp32 rounding.
    assert rows["peft"].note.startswith("max rel diff vs llmkit: y ")
    diffs = [float(part.split()[1]) for part in rows["peft"].note.split(": ", 1)[1].split(", ")]
    assert max(diffs) < 1e-4
    nf4 = cases[2]
    assert any("bytes/parameter" in note for note in nf4.notes)


def test_nf4_linear_cases_agree_with_dequantize_then_matmul():
    from llmkit.bench.nf4_linear import nf4_linear_cases

    opts = _quick()
    case = next(c for c in nf4_linear_cases(opts) if c.params["rows"] == 1)
    result = harness.run_case(case, opts)
    rows = {m.contender: m for m in result.measurements}
    assert rows["llmkit"].ok and rows["dense"].speedup is not None
    rel = float(rows["dequant+mm"].note.split("= ")[1])
    assert rel < 1e-5  # the same 4-bit weight
    assert "quantization error" in rows["dense"].note
