#!/usr/bin/env bash
# GPU check: build llmkit for the GPU at hand only, run every test (CUDA
# parametrisations included), compute-sanitizer memcheck (and racecheck for
# attention) on small cases of each kernel, and the benchmarks; logs and JSON go to $OUT (or $1).
# Made for the device machine: NVIDIA GPU, no internet, torch + nvcc + cmake +
# ninja + scikit-build-core already installed. Budget: under 10 minutes.
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/summary.txt"; }

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
[ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDACXX=/usr/local/cuda/bin/nvcc CUDA_HOME=/usr/local/cuda
log "building for sm_$CAP (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! LLMKIT_CUDA=1 timeout 300 $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT_DIR/build.log" 2>&1; then
    log "BUILD FAILED"; tail -40 "$OUT_DIR/build.log" | tee -a "$OUT_DIR/summary.txt"; exit 1
fi
grep -E "llmkit:" "$OUT_DIR/build.log" | tee -a "$OUT_DIR/summary.txt"
$PY - > "$OUT_DIR/device.json" <<'PYEOF'
import json, subprocess, torch, llmkit
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
print(json.dumps({"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit,
                  "build": llmkit.build_info()}, indent=2))
PYEOF
cat "$OUT_DIR/device.json" | tee -a "$OUT_DIR/summary.txt"

log "tests (CPU and CUDA parametrisations)"
timeout 240 $PY -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" tests > "$OUT_DIR/tests.log" 2>&1
log "tests exit $?: $(tail -1 "$OUT_DIR/tests.log")"
# fp16/bf16 attention forwards take the tensor-core kernel by default; check the SIMT one too.
LLMKIT_ATTN_SIMT=1 timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py \
    > "$OUT_DIR/tests-attention-simt.log" 2>&1
log "attention tests with LLMKIT_ATTN_SIMT=1 exit $?: $(tail -1 "$OUT_DIR/tests-attention-simt.log")"

if command -v compute-sanitizer > /dev/null; then
    log "compute-sanitizer memcheck (small quantize / dequantize / 8-bit cases)"
    cat > "$OUT_DIR/sanitize_case.py" <<'PYEOF'
import torch, llmkit
from llmkit.ops import quantize_nf4, dequantize_nf4
for shape, dtype in [((333, 17), torch.float32), ((1001,), torch.bfloat16), ((7, 64), torch.float16)]:
    w = torch.randn(shape).to(dtype).cuda()
    for dq in (False, True):
        p, s = quantize_nf4(w, 64, dq)
        dequantize_nf4(p, s)
        dequantize_nf4(p, s, out=torch.empty(shape, dtype=dtype, device="cuda"))
        n = torch.Size(shape).numel()  # a buffer at an odd offset: unaligned stores path
        dequantize_nf4(p, s, out=torch.empty(n + 1, dtype=dtype, device="cuda")[1:].view(shape))
torch.cuda.synchronize()
print("sanitize case done")
PYEOF
    timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 $PY "$OUT_DIR/sanitize_case.py" > "$OUT_DIR/memcheck.log" 2>&1
    log "memcheck exit $?: $(grep -E 'ERROR SUMMARY' "$OUT_DIR/memcheck.log" | tail -1)"
    log "compute-sanitizer memcheck + racecheck (small attention forward / backward)"
    cat > "$OUT_DIR/sanitize_attention.py" <<'PYEOF'
import torch, llmkit
from llmkit.ops import flash_attention, flash_attention_varlen
for dtype in (torch.float32, torch.bfloat16):
    for d in (64, 128, 256):
        q = torch.randn(2, 77, 4, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, 93, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        for kw in ({"causal": True}, {"window": (9, 4)}):
            flash_attention(q, k, v, **kw).sum().backward()
    g = torch.zeros(2, 77, dtype=torch.bool, device="cuda"); g[:, [0, 40]] = True
    q2, k2, v2 = (torch.randn(2, 77, 2, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    flash_attention(q2, k2, v2, window=(8, 8), global_tokens=g).sum().backward()
    cu = torch.tensor([0, 5, 5, 6, 70], dtype=torch.int32, device="cuda")
    qv, kv, vv = (torch.randn(70, 2, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    flash_attention_varlen(qv, kv, vv, cu, cu, 64, 64, causal=True).sum().backward()
torch.cuda.synchronize()
print("sanitize attention done")
PYEOF
    log "compute-sanitizer memcheck (small nf4_linear GEMV / tiled / grad_input, lora_linear + dropout)"
    cat > "$OUT_DIR/sanitize_lora.py" <<'PYEOF'
import torch, llmkit
from llmkit.ops import quantize_nf4, nf4_linear, lora_linear
for n, k in [(67, 130), (96, 256)]:
    w = torch.randn(n, k, device="cuda") * 0.05
    for dq in (False, True):
        packed, state = quantize_nf4(w, 64, dq)
        for rows in (1, 3, 40):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k, device="cuda", dtype=dtype, requires_grad=True)
                nf4_linear(x, packed, state).sum().backward()
                A = torch.randn(8, k, device="cuda", dtype=dtype, requires_grad=True)
                B = torch.randn(n, 8, device="cuda", dtype=dtype, requires_grad=True)
                lora_linear(x, (packed, state), None, A, B, 2.0, dropout_p=0.1, seed=3).sum().backward()
                lora_linear(x, w.to(dtype), None, A, B, 2.0).sum().backward()
torch.cuda.synchronize()
print("sanitize lora done")
PYEOF
    timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 $PY "$OUT_DIR/sanitize_lora.py" > "$OUT_DIR/lora-memcheck.log" 2>&1
    log "nf4_linear / lora memcheck exit $?: $(grep -E 'ERROR SUMMARY' "$OUT_DIR/lora-memcheck.log" | tail -1)"
    log "compute-sanitizer memcheck (small word2vec CUDA chunks: skip-gram and CBOW, odd dims, tiny sentences)"
    cat > "$OUT_DIR/sanitize_word2vec.py" <<'PYEOF'
import numpy as np, torch, llmkit
from llmkit import _C
from llmkit.embeddings.word2vec import keep_thresholds, keep_probabilities, noise_table
rng = np.random.default_rng(0)
for vocab, dim in [(1, 1), (7, 33), (50, 100), (300, 130)]:
    counts = rng.integers(1, 100, vocab)
    lengths = [0, 1, 2, 5, 17, 300]
    ids = torch.from_numpy(rng.integers(0, vocab, sum(lengths)).astype(np.int32)).cuda()
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64).cuda()
    keep = keep_thresholds(keep_probabilities(counts, 1e-3)).cuda()
    noise = noise_table(counts).cuda()
    syn0 = (torch.rand(vocab, dim, device="cuda") - 0.5) / dim
    syn1 = torch.zeros(vocab, dim, device="cuda")
    for sg in (True, False):
        for window in (1, 5, 40):
            _C.word2vec.train_chunk_cuda(syn0, syn1, ids, offsets, keep, noise, window, 5, 0.025, 0.01, 7, sg, True, True)
torch.cuda.synchronize()
print("sanitize word2vec done")
PYEOF
    timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 $PY "$OUT_DIR/sanitize_word2vec.py" > "$OUT_DIR/word2vec-memcheck.log" 2>&1
    log "word2vec memcheck exit $?: $(grep -E 'ERROR SUMMARY' "$OUT_DIR/word2vec-memcheck.log" | tail -1)"
    for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool $tool --error-exitcode 3 $PY "$OUT_DIR/sanitize_attention.py" \
            > "$OUT_DIR/attention-$tool.log" 2>&1
        log "attention $tool exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/attention-$tool.log" | tail -1)"
    done
else
    log "compute-sanitizer not found: memcheck skipped"
fi

log "benchmarks"
timeout 300 $PY -m llmkit.bench nf4 attention lora --device cuda --out "$OUT_DIR" > "$OUT_DIR/bench.log" 2>&1
log "bench exit $?"
tail -60 "$OUT_DIR/bench.log" >> "$OUT_DIR/summary.txt"
# word2vec: llmkit on the GPU and on 2 CPU threads, gensim on 2 (the issue's settings), one run each.
log "word2vec benchmark"
timeout 360 $PY -m llmkit.bench word2vec --device all --out "$OUT_DIR" > "$OUT_DIR/bench-word2vec.log" 2>&1
log "word2vec bench exit $?"
tail -15 "$OUT_DIR/bench-word2vec.log" >> "$OUT_DIR/summary.txt"

log "models benchmark (GPT-2 124M bf16 training step: MFU, eager and torch.compile; greedy generation)"
timeout 420 $PY -m llmkit.bench models --device cuda --out "$OUT_DIR" > "$OUT_DIR/bench-models.log" 2>&1
log "models bench exit $?"
tail -20 "$OUT_DIR/bench-models.log" >> "$OUT_DIR/summary.txt"
log "done; results in $OUT_DIR"
