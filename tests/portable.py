"""Run a snippet with LLMKIT_FORCE_SCALAR=1: the CPU kernels' portable (non-AVX2)
builds, chosen once per process, so they need a fresh interpreter."""

import os
import subprocess
import sys


def run_portable(code: str) -> None:
    """Run `code` (which prints "ok" at the end) with the portable kernels; fail with its stderr."""
    env = dict(os.environ, LLMKIT_FORCE_SCALAR="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
