"""pytest at the repository root: the README's Python code blocks run as tests (pytest-markdown-docs).

Each block runs in a fresh temporary directory (the examples write files: adapters, vectors, models)
and imports everything it uses, as a reader copying it would: nothing is injected.
"""

import pytest


@pytest.fixture(autouse=True)
def _markdown_blocks_in_a_temporary_directory(request, tmp_path, monkeypatch):
    if "markdown-docs" in request.keywords:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("LLMKIT_PROGRESS", "0")
    yield
