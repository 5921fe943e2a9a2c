"""Side-by-side micro-benchmark harness behind `llmkit bench`.

A Benchmark is a name and a list of Cases. A Case is one workload (shape,
dtype, device) with the bytes it moves, and Contenders: callables that do the
same work, one of them llmkit's ("ours"), the others its peers.

For each case the harness builds every contender, warms it up, then takes the
timed samples round-robin across contenders, so that the drift of a shared
machine (clocks, noisy neighbours) hits all of them alike. It reports the
median (and min) per contender and the speedup of ours over each peer.
Absolute numbers drift on shared CPUs; the ratios are what to read.

Each row also states how close it gets to the machine's memory-bandwidth
floor: a large tensor copy measured once per run and device.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from llmkit.utils import atomic_write, get_logger, optional, progress_bar, write_text

log = get_logger(__name__)

COPY_FLOOR_BYTES = 256 * 1024 * 1024  # large enough to defeat the caches of CPUs and GPUs at hand


# --------------------------------------------------------------------------- model


@dataclass
class Contender:
    """One implementation of a case's work.

    `setup(inputs)` does the untimed preparation (imports, pre-quantizing, ...)
    and returns the zero-argument callable that is timed. An exception from
    setup or from the first call marks the contender unavailable (with the
    reason in the table) instead of failing the whole run.
    """

    name: str
    setup: Callable[[Any], Callable[[], Any]]
    ours: bool = False


@dataclass
class Case:
    """One workload, run by every contender.

    bytes_in counts what the GB/s column reports (the benchmark says what:
    usually the input read). bytes_moved counts bytes read + written, which
    is compared with the copy floor (also read + written).
    """

    name: str
    device: str
    bytes_in: int
    bytes_moved: int
    contenders: list[Contender]
    make_inputs: Callable[[], Any] = lambda: None
    params: dict = field(default_factory=dict)
    # check(outputs by contender name) -> notes by contender name; used to show
    # that the contenders computed the same thing (a fast wrong kernel is no win).
    check: Callable[[dict[str, Any]], dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)
    # Overrides RunOptions.max_call_s for this case: a headline comparison
    # whose slow peer takes seconds per call must still be timed.
    max_call_s: float | None = None
    # Overrides RunOptions.budget_s: a headline case of ~1 s calls on a noisy
    # machine needs more than 3 samples for a median worth reading.
    budget_s: float | None = None


@dataclass
class Benchmark:
    name: str
    description: str
    cases: Callable[["RunOptions"], list[Case]]
    # Called on the finished result (e.g. to note rates relative to a peak
    # measured in the same run) before it is printed or saved.
    finish: Callable[["BenchResult"], None] | None = None
    # A benchmark that is not a set of timed calls (whole training runs) runs
    # itself: runner(options, out_dir) prints and writes its own results.
    runner: Callable[["RunOptions", Path], Any] | None = None


@dataclass
class RunOptions:
    quick: bool = False
    repeats: int = 10  # timed samples per contender, at most
    min_repeats: int = 3  # slow contenders get fewer samples, never fewer than this
    budget_s: float = 3.0  # timed seconds per contender per case before repeats are cut
    max_call_s: float = 5.0  # a contender whose warm-up call takes longer is skipped
    warmup_s: float = 0.2  # warm-up calls until this much time has passed (at least one)
    min_sample_s: float = 0.005  # calls per sample so a sample is this long (timer, launch overhead)
    devices: tuple[str, ...] = ("cpu", "cuda")
    progress: bool = True
    explicit_repeats: int | None = None  # --repeats as given (runners with their own default read it)


@dataclass
class Measurement:
    contender: str
    ours: bool
    samples_s: list[float] = field(default_factory=list)  # seconds per call, one entry per sample
    calls_per_sample: int = 0
    median_s: float | None = None
    min_s: float | None = None
    gbps_in: float | None = None  # Case.bytes_in / median
    floor_fraction: float | None = None  # (Case.bytes_moved / median) / copy-floor GB/s
    speedup: float | None = None  # their median / our median: > 1 means llmkit is faster
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.median_s is not None


@dataclass
class CaseResult:
    name: str
    device: str
    params: dict
    bytes_in: int
    bytes_moved: int
    measurements: list[Measurement]
    notes: list[str]


@dataclass
class Floor:
    """Memory-bandwidth floor of one device: dst.copy_(src), bytes read + written."""

    device: str
    bytes_moved: int
    gbps: float
    median_s: float
    min_s: float
    samples_s: list[float]


@dataclass
class BenchResult:
    benchmark: str
    description: str
    created: str
    options: dict
    machine: dict
    floors: dict[str, Floor]
    cases: list[CaseResult]
    wall_s: float


# --------------------------------------------------------------------------- timing


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading the clock: CUDA work is asynchronous."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_calls(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call, averaged over `calls` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def plan_samples(per_call_s: float, opts: RunOptions, budget_s: float | None = None) -> tuple[int, int]:
    """(calls per sample, number of samples) for a call that takes per_call_s.

    Fast calls are batched so one sample outlasts timer and launch noise; slow
    calls get fewer samples so one contender cannot eat the run.
    """
    per_call_s = max(per_call_s, 1e-9)
    calls = max(1, math.ceil(opts.min_sample_s / per_call_s))
    affordable = int((opts.budget_s if budget_s is None else budget_s) / (per_call_s * calls))
    repeats = min(opts.repeats, max(opts.min_repeats, affordable))
    return calls, repeats


def _warm_up(fn: Callable[[], Any], sync, opts: RunOptions, max_call_s: float) -> tuple[Any, float]:
    """Call fn at least twice and until warmup_s has passed; return (first output, s per call).

    The first call pays one-time costs (allocation, page faults, lazy init),
    so the per-call estimate leaves it out. A call slower than its share of
    the budget (budget_s / min_repeats) gets no second warm-up call.
    """
    sync()
    start = time.perf_counter()
    output = fn()
    sync()
    times = [time.perf_counter() - start]
    if times[0] > max_call_s or times[0] > opts.budget_s / max(opts.min_repeats, 1):
        return output, times[0]
    while len(times) < 2 or (sum(times) < opts.warmup_s and len(times) < 1000):
        times.append(time_calls(fn, 1, sync))
    return output, sum(times[1:]) / (len(times) - 1)


def add_note(m: Measurement, note: str) -> None:
    m.note = "; ".join(n for n in (m.note, note) if n)


def _error_note(prefix: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{prefix}: {type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_case(case: Case, opts: RunOptions, floor_gbps: float | None = None) -> CaseResult:
    sync = synchronizer(case.device)
    max_call_s = case.max_call_s if case.max_call_s is not None else opts.max_call_s
    inputs = case.make_inputs()
    measurements = {c.name: Measurement(c.name, c.ours) for c in case.contenders}
    timed: dict[str, Callable[[], Any]] = {}
    planned: dict[str, int] = {}
    outputs: dict[str, Any] = {}

    for contender in case.contenders:
        m = measurements[contender.name]
        try:
            fn = contender.setup(inputs)
            outputs[contender.name], per_call = _warm_up(fn, sync, opts, max_call_s)
        except Exception as err:  # an unavailable peer must not stop the others
            add_note(m, _error_note("unavailable", err))
            continue
        if per_call > max_call_s:
            add_note(m, f"skipped: one call took {per_call:.1f} s (limit {max_call_s:g} s)")
            outputs.pop(contender.name)
            continue
        m.calls_per_sample, planned[contender.name] = plan_samples(per_call, opts, case.budget_s)
        timed[contender.name] = fn

    notes = list(case.notes)
    if case.check is not None and outputs:
        try:
            for name, note in case.check(outputs).items():
                add_note(measurements[name], note)
        except Exception as err:
            notes.append(_error_note("output check failed", err))
    outputs.clear()  # free the warm-up outputs before timing

    # Round-robin; the order rotates each round so no contender always runs
    # right after the same neighbour (caches, clocks, allocator state).
    names = list(timed)
    for round_index in range(max(planned.values(), default=0)):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            m = measurements[name]
            if name in timed and len(m.samples_s) < planned[name]:
                try:
                    m.samples_s.append(time_calls(timed[name], m.calls_per_sample, sync))
                except Exception as err:
                    add_note(m, _error_note("failed while timing", err))
                    m.samples_s.clear()
                    del timed[name]

    for m in measurements.values():
        if m.samples_s:
            m.median_s, m.min_s = median(m.samples_s), min(m.samples_s)
            m.gbps_in = case.bytes_in / m.median_s / 1e9
            if floor_gbps and case.bytes_moved:  # 0: not a memory-bound workload, no floor to compare
                m.floor_fraction = case.bytes_moved / m.median_s / 1e9 / floor_gbps
    add_speedups(list(measurements.values()))
    return CaseResult(case.name, case.device, case.params, case.bytes_in, case.bytes_moved,
                      list(measurements.values()), notes)


def add_speedups(measurements: list[Measurement]) -> None:
    """speedup = their median / our median, set on each peer (> 1: llmkit is faster)."""
    ours = next((m for m in measurements if m.ours and m.ok), None)
    for m in measurements:
        m.speedup = m.median_s / ours.median_s if ours is not None and m.ok and not m.ours else None


def measure_copy_floor(device: str, opts: RunOptions, nbytes: int = COPY_FLOOR_BYTES) -> Floor:
    """GB/s of dst.copy_(src) on `device`, counting bytes read + written."""

    def make_inputs():
        src = torch.rand(nbytes // 4, device=device)
        return src, torch.empty_like(src)

    def setup(tensors):
        src, dst = tensors
        return lambda: dst.copy_(src)

    case = Case(f"copy {nbytes >> 20} MiB", device, bytes_in=2 * nbytes, bytes_moved=2 * nbytes,
                contenders=[Contender("copy", setup)], make_inputs=make_inputs)
    m = run_case(case, opts).measurements[0]
    if not m.ok:
        raise RuntimeError(f"copy floor on {device} could not be measured: {m.note}")
    return Floor(device, 2 * nbytes, m.gbps_in, m.median_s, m.min_s, m.samples_s)


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def run_benchmark(bench: Benchmark, opts: RunOptions, floors: dict[str, Floor] | None = None) -> BenchResult:
    """Run every case of `bench`. `floors` (device -> Floor) is shared between
    the benchmarks of one run so each device's floor is measured once."""
    floors = {} if floors is None else floors
    started = time.perf_counter()
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    cases = bench.cases(opts)
    results = []
    bar = progress_bar(cases, desc=bench.name, unit="case", leave=False, disable=not opts.progress)
    for case in bar:
        if case.device not in floors:
            bar.set_postfix_str(f"copy floor on {case.device}")
            floors[case.device] = measure_copy_floor(case.device, opts)
        bar.set_postfix_str(case.name)
        results.append(run_case(case, opts, floors[case.device].gbps))
    used = {r.device for r in results}
    result = BenchResult(
        benchmark=bench.name,
        description=bench.description,
        created=created,
        options=asdict(opts),
        machine=machine_info(),
        floors={d: f for d, f in floors.items() if d in used},
        cases=results,
        wall_s=time.perf_counter() - started,
    )
    if bench.finish is not None:
        bench.finish(result)
    return result


# --------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni",
             "amx_bf16", "amx_int8", "amx_tile")


def cpu_isa() -> str:
    """What the CPU's vector units can do, as results must say (a VM's model name often hides it):
    torch's dispatch level (DEFAULT / AVX2 / AVX512) and the relevant /proc/cpuinfo flags."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = "unknown"
    present = [f for f in ISA_FLAGS if f in flags]
    return f"{capability} ({' '.join(present) or 'no flags read'})"


def git_root(path: Path) -> Path | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 else None


def git_info() -> dict | None:
    """Commit of the source tree llmkit was imported from (else of the cwd)."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        root = git_root(where)
        if root is None:
            continue

        def git(*args):
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None

        return {"root": str(root), "commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    return None


def machine_info() -> dict:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "git": git_info(),
    }
    try:
        import llmkit

        info["llmkit_build"] = llmkit.build_info()
    except Exception as err:
        info["llmkit_build"] = {"error": _error_note("unavailable", err)}
    try:  # the installed version, without paying bitsandbytes' slow import
        info["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        info["bitsandbytes"] = None
    return info


def device_label(result: BenchResult) -> str:
    """The machine in a file name: the GPU's name if a case ran on one, else the host."""
    name = result.machine["hostname"]
    if any(c.device.startswith("cuda") for c in result.cases) and result.machine["cuda_devices"]:
        name = result.machine["cuda_devices"][0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# --------------------------------------------------------------------------- output

COLUMNS = ("case", "device", "contender", "median ms", "min ms", "GB/s in",
           "% copy floor", "samples", "llmkit speedup (their/our time)")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(result: BenchResult) -> list[tuple[str, ...]]:
    rows = []
    for case in result.cases:
        for i, m in enumerate(case.measurements):
            rows.append((
                case.name if i == 0 else "",
                case.device if i == 0 else "",
                m.contender + (" (ours)" if m.ours else ""),
                _fmt(m.median_s and m.median_s * 1e3, ".3f"),
                _fmt(m.min_s and m.min_s * 1e3, ".3f"),
                _fmt(m.gbps_in, ".2f"),
                _fmt(m.floor_fraction and m.floor_fraction * 100, ".1f"),
                str(len(m.samples_s)) if m.ok else "-",
                "" if m.ours else _fmt(m.speedup, ".2f") + ("x" if m.speedup is not None else ""),
            ))
    return rows


def summary_lines(result: BenchResult) -> list[str]:
    mach = result.machine
    lines = [f"{result.benchmark}: {result.description}",
             f"cpu: {mach['cpu']} [{mach.get('cpu_isa', '?')}], {mach['torch_threads']} torch threads; "
             f"torch {mach['torch']}"]
    if mach["cuda_devices"]:
        lines.append(f"cuda: {', '.join(mach['cuda_devices'])}")
    for floor in result.floors.values():
        lines.append(f"copy floor ({floor.device}): {floor.gbps:.1f} GB/s "
                     f"(dst.copy_(src) of {floor.bytes_moved // 2 >> 20} MiB, bytes read + written)")
    opts = result.options
    lines.append("speedup = their median time / our median time (> 1: llmkit is faster); "
                 "% copy floor = bytes read + written per second / copy floor")
    lines.append(f"samples: up to {opts['repeats']} per contender, interleaved; slower calls get fewer "
                 f"(at least {opts['min_repeats']}, {opts['budget_s']:g} s per contender and case); "
                 f"calls over {opts['max_call_s']:g} s are skipped")
    return lines


def note_lines(result: BenchResult) -> list[str]:
    lines = []
    for case in result.cases:
        lines += [f"  {case.name} [{case.device}]: {n}" for n in case.notes]
        lines += [f"  {case.name} [{case.device}] {m.contender}: {m.note}" for m in case.measurements if m.note]
    return ["notes:"] + lines if lines else []


def aligned(rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """rows[0] (the header), a rule, then the other rows: the first `left`
    columns (text) aligned left, the rest (numbers) right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]


def format_table(result: BenchResult) -> str:
    """The result as plain text: summary, aligned table, notes."""
    body = aligned([COLUMNS] + table_rows(result), left=3)
    return "\n".join(summary_lines(result) + [""] + body + [""] + note_lines(result)).rstrip() + "\n"


def print_table(result: BenchResult, file=None) -> None:
    """Print with rich on a terminal when it is installed, plain text otherwise
    (rich squeezes a wide table into 80 columns when output goes to a file or pipe)."""
    file = file or sys.stdout
    if not (hasattr(file, "isatty") and file.isatty()):
        print(format_table(result), file=file)
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(result), file=file)
        return
    console = Console(file=file)
    for line in summary_lines(result):
        console.print(line, highlight=False, markup=False)
    table = Table(*COLUMNS)
    for i in range(3, len(COLUMNS)):
        table.columns[i].justify = "right"
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    for line in note_lines(result):
        console.print(line, highlight=False, markup=False)


def result_to_json(result: BenchResult) -> dict:
    return asdict(result)


def write_plot(result: BenchResult, path: Path) -> bool:
    """Bar plot of llmkit's speedup over each peer, per case; False if there is no ratio to plot
    (or matplotlib, an optional dependency, is not installed)."""
    if optional("matplotlib") is None:
        log.warning("matplotlib is not installed: no plot (pip install 'llmkit[plot]')")
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    cases = [c for c in result.cases if any(m.speedup for m in c.measurements)]
    peers = list(dict.fromkeys(m.contender for c in cases for m in c.measurements if m.speedup))
    if not cases:
        return False
    fig = Figure(figsize=(max(6.0, 0.9 * len(cases) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    width = 0.8 / len(peers)
    ratios = []
    for j, peer in enumerate(peers):
        heights = []
        for c in cases:
            m = next((m for m in c.measurements if m.contender == peer), None)
            heights.append(m.speedup if m and m.speedup else float("nan"))
        ratios += [h for h in heights if h == h]
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(cases))]
        bars = ax.bar(xs, heights, width, label=f"vs {peer}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="parity")
    if max(ratios) / min(ratios) > 20:
        ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.margins(y=0.12)  # room for the bar labels
    ax.set_xticks(range(len(cases)), [f"{c.name}\n[{c.device}]" for c in cases],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("llmkit speedup (their time / our time)")
    ax.set_title(f"{result.benchmark} on {device_label(result)}: > 1 means llmkit is faster")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return True


def default_out_dir() -> Path:
    """bench/results under the git root of the cwd, else under the cwd."""
    return (git_root(Path.cwd()) or Path.cwd()) / "bench" / "results"


def file_label(name: str) -> str:
    """A device or host name as a file-name part: lowercase alphanumerics and dashes."""
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-") or "unknown"


def report_run_result(name: str, result: dict, out_dir: Path, label: str,
                      format_table: Callable[[dict], str], write_plot: Callable[[dict, Path], bool]) -> dict[str, Path]:
    """For benchmarks that time whole runs (their own runner and result dict):
    print the table, write <name>-<label>-<timestamp>.{json,txt,png}, say where."""
    print(format_table(result))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.fromisoformat(result["created"]).strftime("%Y%m%d-%H%M%S")
    stem = out_dir / f"{name}-{file_label(label)}-{stamp}"
    written = {"json": stem.with_suffix(".json"), "txt": stem.with_suffix(".txt")}
    write_text(written["json"], json.dumps(result, indent=2) + "\n")
    write_text(written["txt"], format_table(result))
    if write_plot(result, stem.with_suffix(".png")):
        written["png"] = stem.with_suffix(".png")
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    print(f"({name}: {result['wall_s']:.1f} s)\n")
    return written


def save_result(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """Write <name>-<device>-<timestamp>.{json,txt,png}; return what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.fromisoformat(result.created).strftime("%Y%m%d-%H%M%S")
    stem = out_dir / f"{result.benchmark}-{device_label(result)}-{stamp}"
    written = {"json": stem.with_suffix(".json"), "txt": stem.with_suffix(".txt")}
    write_text(written["json"], json.dumps(result_to_json(result), indent=2) + "\n")
    write_text(written["txt"], format_table(result))
    if write_plot(result, stem.with_suffix(".png")):
        written["png"] = stem.with_suffix(".png")
    return written
