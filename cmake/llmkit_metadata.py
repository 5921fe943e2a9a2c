"""Build-time package metadata: the wheel is tied to the torch it is compiled against.

llmkit's extension links torch's C++ libraries, whose ABI changes between
releases, so a wheel works only with the torch it was built with. As torchao
and other compiled torch extensions do, the wheel says so:

- version: ``<base>+torch<X.Y.Z>.<cuXYZ|cpu>`` (a PEP 440 local tag naming the
  torch build), e.g. ``0.1.0+torch2.14.1.cu130``;
- dependencies: ``torch==<X.Y.Z>`` (the distribution version pip resolves;
  torch's wheels carry the ``+cu130`` part only in ``torch.__version__``).

An sdist has no torch yet: it gets the base version and the build
requirement's range. The torch read is the one in the build environment
(``pip install .`` installs ``[build-system] requires``; with
``--no-build-isolation`` it is the installed one), found without importing
torch (that takes seconds and is not needed for two strings).

A scikit-build-core ``[[tool.dynamic-metadata]]`` provider (dynamic-metadata
0.3 protocol): ``dynamic_metadata(settings, project)`` returns the fields.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

BASE_VERSION = "0.1.0"  # the one place the version is written; llmkit.__version__ reads the installed metadata
TORCH_RANGE = "torch>=2.4,<=2.14.1"  # what llmkit's sources are tested with (2.14 needs C++20)

_state = "wheel"


def _torch_build() -> tuple[str, str]:
    """(distribution version, build tag) of the torch in this environment, e.g. ("2.14.1", "cu130")."""
    try:
        dist_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("building llmkit needs torch in the build environment "
                           f"({TORCH_RANGE}; with --no-build-isolation install it first)") from None
    spec = importlib.util.find_spec("torch")
    cuda = None
    if spec is not None and spec.origin:
        version_py = os.path.join(os.path.dirname(spec.origin), "version.py")
        try:
            text = open(version_py, encoding="utf-8").read()
        except OSError:
            text = ""
        match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", text, re.M)
        cuda = match.group(1) if match else None
    public = dist_version.split("+")[0]
    return public, ("cu" + cuda.replace(".", "")) if cuda else "cpu"


def build_state(state: str) -> None:
    global _state
    _state = state


def dynamic_metadata(settings, project):
    if _state == "sdist":
        return {"version": BASE_VERSION, "dependencies": [TORCH_RANGE]}
    torch_version, tag = _torch_build()
    return {"version": f"{BASE_VERSION}+torch{torch_version}.{tag}", "dependencies": [f"torch=={torch_version}"]}
