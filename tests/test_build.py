"""What the build says about itself, and the guard against a mismatched torch."""

import subprocess
import sys

import torch

import llmkit


def test_build_info_describes_this_build():
    info = llmkit.build_info()
    assert info["cpu"] is True
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
        assert torch.version.cuda is not None
    else:
        assert info["cuda_archs"] == []
    for name in ("quantize_nf4", "dequantize_nf4", "dequantize_nf4_into", "quantize_blockwise_8bit"):
        assert hasattr(torch.ops.llmkit, name)


def test_other_torch_version_says_rebuild():
    script = "import torch; torch.__version__ = '0.0.1+other'\nimport llmkit\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "rebuild" in result.stderr
    assert "0.0.1+other" in result.stderr


def test_cli_info_prints_build_info():
    result = subprocess.run([sys.executable, "-m", "llmkit.cli", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f'"torch": "{torch.__version__}"' in result.stdout
