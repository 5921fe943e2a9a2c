"""`llmkit bench`: micro-benchmarks of llmkit's kernels against their peers.

Benchmarks live in modules of this package (nf4.py, ...) and register
themselves on import; `registered()` imports them. The harness that runs and
reports them is in harness.py. `python -m llmkit.bench` and `llmkit bench`
share `add_arguments` / `run_from_args` below.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from llmkit.utils.cliargs import add_output_argument

from .harness import Benchmark, Case, Contender, RunOptions, default_out_dir, print_table, run_benchmark, save_result

__all__ = ["Benchmark", "Case", "Contender", "RunOptions", "register", "registered",
           "make_options", "add_arguments", "run_from_args", "list_benchmarks", "main"]

# Modules that define benchmarks; imported lazily so `import llmkit.bench` stays cheap.
BENCHMARK_MODULES = ("nf4", "attention", "lora", "word2vec", "models", "pretrain")

_REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    _REGISTRY[bench.name] = bench
    return bench


def registered() -> dict[str, Benchmark]:
    for module in BENCHMARK_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return dict(_REGISTRY)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run, or 'all' (some take tens of minutes); "
                             "with no name, the list of benchmarks is printed")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and a short time budget (smoke runs, the demo)")
    add_output_argument(parser, aliases=("--out",),
                        help="directory for the JSON, table and plot "
                             "(default: bench/results under the git root of the cwd, else the cwd)")
    parser.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                        help="timed samples per contender (slow contenders may get fewer; default 10, quick 5)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="which devices' cases to run (cuda only when available)")


def make_options(quick: bool = False, repeats: int | None = None, device: str = "all",
                 progress: bool = True) -> RunOptions:
    opts = RunOptions(quick=quick, progress=progress)
    if quick:
        opts.repeats, opts.budget_s = 5, 1.0
    if repeats is not None:
        opts.repeats = repeats
        opts.explicit_repeats = repeats
        opts.min_repeats = min(opts.min_repeats, repeats)
    if device != "all":
        opts.devices = (device,)
    return opts


def options_from_args(args: argparse.Namespace) -> RunOptions:
    return make_options(args.quick, args.repeats, args.device)


def select(names: list[str]) -> list[Benchmark]:
    """The benchmarks named (``all``: every one), in the order given."""
    available = registered()
    if names == ["all"]:
        return [available[n] for n in sorted(available)]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(sorted(available))}, all")
    return [available[n] for n in names]


def list_benchmarks(file=None) -> None:
    """What `llmkit bench` with no name prints: each benchmark and what it compares."""
    available = registered()
    width = max(len(n) for n in available)
    print("benchmarks (run one with `llmkit bench NAME [--quick]`, every one with `llmkit bench all`):", file=file)
    for name in sorted(available):
        print(f"  {name:<{width}}  {available[name].description}", file=file)


def run_from_args(args: argparse.Namespace) -> int:
    if not args.names:
        list_benchmarks()
        return 0
    benches = select(args.names)
    opts = options_from_args(args)
    out_dir = Path(args.output) if args.output else default_out_dir()
    floors: dict = {}  # measured once per device, shared by all benchmarks of this run
    for bench in benches:
        if bench.runner is not None:
            bench.runner(opts, out_dir)
            continue
        result = run_benchmark(bench, opts, floors)
        if not result.cases:
            print(f"{bench.name}: no cases on device(s) {', '.join(opts.devices)} here; nothing written\n")
            continue
        print_table(result)
        for kind, path in save_result(result, out_dir).items():
            print(f"wrote {kind}: {path}")
        print(f"({bench.name}: {result.wall_s:.1f} s)\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmkit.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
