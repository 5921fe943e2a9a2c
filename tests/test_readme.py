"""The README's shell examples run as written.

Its ```python blocks are executed by pytest-markdown-docs (README.md is in pytest's testpaths). Shell blocks
cannot be: here every ```bash block whose info string says `test` (```bash test: GitHub shows it as bash) runs
in a fresh temporary directory under `bash -euo pipefail`, with this interpreter's `llmkit` first on PATH.
Blocks that need a GPU or many minutes are plain ```bash and are not run; this test checks that there are
few of them, and that no block holds a literal placeholder.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number) of every fenced block of `language`."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip()
        if info.split(" ")[0] == language:
            found.append((info, match.group(2), text.count("\n", 0, match.start()) + 1))
    return found


SHELL = [b for b in blocks("bash") if "test" in b[0].split()[1:]]


@pytest.mark.parametrize("info,code,line", SHELL, ids=[f"README.md:{b[2]}" for b in SHELL])
def test_readme_shell_block(info, code, line, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               LLMKIT_PROGRESS="0")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"README.md:{line} failed:\n{code}\n--- stdout\n{out.stdout[-3000:]}\n" \
                                f"--- stderr\n{out.stderr[-3000:]}"


def test_readme_blocks_are_runnable_as_written():
    python = blocks("python")
    assert python, "README has no python blocks?"
    skipped = [b for b in python if "notest" in b[0].split()]
    assert len(skipped) <= len(python) // 3, f"too many python blocks are not run: lines {[b[2] for b in skipped]}"
    for info, code, line in python + blocks("bash"):
        for placeholder in ("[--device", "<your", "corpus.txt", "my_texts/", "docs.jsonl"):
            assert placeholder not in code, f"README.md:{line}: literal placeholder {placeholder!r} in a code block"
    for info, code, line in blocks("bash"):  # Python blocks run (and `...` is Python's Ellipsis there)
        statements = "\n".join(text.split(" #")[0] for text in code.splitlines())  # comments may say "..."
        assert "..." not in statements, f"README.md:{line}: '...' standing for code in a shell block"
