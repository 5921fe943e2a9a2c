"""What users type: `pip install .` into a fresh virtual environment, then import llmkit and run an op.

This is the isolated build (no --no-build-isolation): pip installs `[build-system] requires` (torch in the
tested range) into a build environment, compiles against it, and the wheel pins that torch. The CUDA kernels
are left out (LLMKIT_CUDA=0) to keep the test to a few minutes; the CPU build is the same code path.
"""

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> None:
    """The files a clean clone has (tracked, plus untracked-but-not-ignored ones), not build/ or .venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_pip_install_dot_in_a_clean_venv(tmp_path):
    src, env_dir = tmp_path / "src", tmp_path / "venv"
    _source_copy(src)
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PIP_"))}
    env.update(LLMKIT_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "."], cwd=src, env=env,
                             capture_output=True, text=True, timeout=1500)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]

    probe = (
        "import importlib.metadata as md, json, torch, llmkit\n"
        "from llmkit.ops import quantize_nf4, dequantize_nf4\n"
        "w = torch.randn(37, 64)\n"
        "packed, state = quantize_nf4(w, blocksize=64)\n"
        "err = (dequantize_nf4(packed, state) - w).abs().max().item()\n"
        "print(json.dumps({'version': llmkit.__version__, 'torch': torch.__version__, 'err': err,\n"
        "                  'requires': md.requires('llmkit'), 'build': llmkit.build_info()}))\n"
    )
    run = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    torch_public = info["torch"].split("+")[0]
    # The wheel names and pins the torch it was compiled against.
    assert info["version"].startswith("0.") and f"+torch{torch_public}." in info["version"]
    assert f"torch=={torch_public}" in info["requires"]
    hard = [r for r in info["requires"] if "extra ==" not in r]
    assert not any(r.startswith(("matplotlib", "scipy")) for r in hard), hard  # optional extras only
    assert info["build"]["torch"] == info["torch"] and info["build"]["cuda"] is False
    assert 0 < info["err"] < 0.5  # an NF4 round trip of N(0, 1) weights

    cli = subprocess.run([str(env_dir / "bin" / "llmkit"), "--version"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and cli.stdout.strip() == f"llmkit {info['version']}"
