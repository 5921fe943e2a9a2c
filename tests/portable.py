"""Run a snippet with LLMKIT_FORCE_SCALAR=1: the CPU kernels' portable (non-AVX2)
builds, chosen once per process, so they need a fresh interpreter. The tests
folder is on its import path, so a snippet can reuse a test module's helpers."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)


def run_portable(code: str) -> None:
    """Run `code` (which prints "ok" at the end) with the portable kernels; fail with its stderr."""
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, LLMKIT_FORCE_SCALAR="1", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
