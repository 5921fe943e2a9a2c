#!/usr/bin/env bash
# Set up llmkit from nothing: a virtualenv in .venv, torch, the test and
# benchmark references, and the package built against that torch (C++ CPU
# kernels always; CUDA kernels too when torch is a CUDA build and nvcc is found).
# Re-running it is cheap: installed packages are kept, the build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LLMKIT_TORCH_SPEC:-torch<=2.14.1}   # torch 2.14 headers need C++20; newer is untested

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip install -q "$TORCH_SPEC"
# build tools (--no-build-isolation: the extension must see the installed torch),
# runtime deps, and the references that tests and benchmarks compare against
# (the same set as pyproject's [test] extra, with the peers pinned to the versions the tests know)
pip install -q "scikit-build-core>=1.1,<2" "pybind11>=2.12" ninja "cmake>=3.22" \
    numpy tqdm safetensors tokenizers matplotlib scipy pytest "pytest-markdown-docs>=0.9" \
    "bitsandbytes==0.50.*" transformers accelerate peft "gensim==4.4.*"

# A wrapper nvcc on PATH can confuse CMake's toolkit discovery: point at the toolkit.
if [ -z "${CUDACXX:-}" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export CUDACXX=$CUDA_HOME/bin/nvcc
fi
echo "setup: building llmkit (first build compiles the CUDA sources: a few minutes)"
pip install -q --no-build-isolation --no-deps .
python -c "import json, llmkit; print('setup: llmkit', json.dumps(llmkit.build_info()))"
