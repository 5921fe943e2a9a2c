"""Bad input to every op, through the Python wrappers and the raw
``torch.ops.llmkit.*`` ops: zero-sized dimensions give the reference's result
or a clear exception, tensors on another device (a meta ``cu_seqlens`` among
CPU tensors) are rejected instead of reading garbage, outputs that share
memory with an input are rejected, and the word2vec / GloVe trainers raise
when the system refuses their threads. Never a crash.

The cases run in a child interpreter (one for all of them, restarted after a
crash), so a SIGFPE or abort fails its own case instead of killing pytest;
NaN / inf semantics are in test_ops_nonfinite.py.
"""

import json
import os
import subprocess
import sys

import pytest

# name -> (code, expected): "ok" (the code runs; its asserts check the result against the
# reference) or (exception class name, regex on its message).
CASES = {
    # ---- linear_gemv / decode_linear: in_features 0 is a GEMM with K = 0 (was SIGFPE)
    "gemv_in_features_0": ("""
        y = llmkit.ops.linear_gemv(torch.randn(1, 0), torch.randn(4, 0))
        assert torch.equal(y, torch.zeros(1, 4))""", "ok"),
    "gemv_in_features_0_bias_raw": ("""
        b = torch.randn(4)
        y = torch.ops.llmkit.linear_gemv(torch.randn(2, 3, 0), torch.randn(4, 0), b)
        assert torch.equal(y, b.expand(2, 3, 4))""", "ok"),
    "gemv_rows_0_and_out_0": ("""
        assert llmkit.ops.linear_gemv(torch.randn(0, 3), torch.randn(4, 3)).shape == (0, 4)
        assert llmkit.ops.linear_gemv(torch.randn(2, 3), torch.randn(0, 3)).shape == (2, 0)""", "ok"),
    "decode_linear_in_features_0": ("""
        w, b = torch.randn(4, 0), torch.randn(4)
        for rows in (1, 20):
            x = torch.randn(rows, 0)
            assert torch.equal(llmkit.ops.decode_linear(x, w, b), F.linear(x, w, b))""", "ok"),
    "gemv_0d_x": ("llmkit.ops.linear_gemv(torch.randn(()), torch.randn(4, 1))", ("ValueError", "in_features")),
    # ---- lora: in_features 0 (backward was SIGFPE), out_features 0, no rows, rank 0
    "lora_raw_in_features_0": ("""
        x, w, b, A, B = torch.randn(2, 0), torch.randn(4, 0), torch.randn(4), torch.randn(2, 0), torch.randn(4, 2)
        args = (w, None, None, 64, [], None, None, None, 256)
        y = torch.ops.llmkit.lora_linear(x, *args, b, A, B, 1.0, 0.0, torch.tensor(0))
        assert torch.equal(y, b.expand(2, 4))
        gx, gA, gB = torch.ops.llmkit.lora_linear_backward(torch.randn(2, 4), x, *args, A, B, 1.0, 0.5,
                                                           torch.tensor(0), True)
        assert gx.shape == (2, 0) and gA.shape == (2, 0) and torch.equal(gB, torch.zeros(4, 2))""", "ok"),
    "lora_wrapper_in_features_0_autograd": ("""
        x = torch.randn(3, 0, requires_grad=True)
        A, B = torch.randn(2, 0, requires_grad=True), torch.randn(5, 2, requires_grad=True)
        b = torch.randn(5, requires_grad=True)
        y = llmkit.ops.lora_linear(x, torch.randn(5, 0), b, A, B, 0.5)
        torch.testing.assert_close(y.double(), R.lora_linear(x, torch.randn(5, 0), b, A, B, 0.5))
        y.sum().backward()
        assert torch.equal(B.grad, torch.zeros(5, 2)) and torch.equal(b.grad, torch.full((5,), 3.0))""", "ok"),
    "lora_raw_out_features_0": ("""
        x, w, A, B = torch.randn(2, 3), torch.randn(0, 3), torch.randn(2, 3), torch.randn(0, 2)
        args = (w, None, None, 64, [], None, None, None, 256)
        assert torch.ops.llmkit.lora_linear(x, *args, None, A, B, 1.0, 0.0, torch.tensor(0)).shape == (2, 0)
        gx, gA, gB = torch.ops.llmkit.lora_linear_backward(torch.randn(2, 0), x, *args, A, B, 1.0, 0.0,
                                                           torch.tensor(0), True)
        assert torch.equal(gx, torch.zeros(2, 3)) and torch.equal(gA, torch.zeros(2, 3)) and gB.shape == (0, 2)""",
                                "ok"),
    "lora_no_rows": ("""
        x = torch.randn(0, 3, requires_grad=True)
        y = llmkit.ops.lora_linear(x, torch.randn(4, 3), None, torch.randn(2, 3), torch.randn(4, 2), 1.0, 0.3)
        assert y.shape == (0, 4)
        y.sum().backward()
        assert x.grad.shape == (0, 3)""", "ok"),
    "lora_rank_0": ("""
        llmkit.ops.lora_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(0, 3), torch.randn(4, 0),
                               1.0)""", ("ValueError", "rank r .* must be >= 1")),
    "lora_grad_out_wrong_rows": ("""
        args = (torch.randn(4, 3), None, None, 64, [], None, None, None, 256)
        torch.ops.llmkit.lora_linear_backward(torch.randn(5, 4), torch.randn(2, 3), *args, torch.randn(2, 3),
                                              torch.randn(4, 2), 1.0, 0.0, torch.tensor(0), True)""",
                                 ("ValueError", "grad_out must have")),
    # ---- NF4: empty tensors are rejected everywhere (bitsandbytes cannot quantize them either)
    "nf4_quantize_empty": ("llmkit.ops.quantize_nf4(torch.empty(0, 5))", ("ValueError", "empty")),
    "nf4_dequantize_zero_dim": ("""
        torch.ops.llmkit.dequantize_nf4(torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), 64, [4, 0],
                                        torch.float32)""", ("ValueError", "at least one element")),
    "nf4_linear_zero_in_features_raw": ("""
        torch.ops.llmkit.nf4_linear(torch.randn(2, 0), torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), 64,
                                    [4, 0])""", ("ValueError", "at least one element")),
    "nf4_linear_no_rows": ("""
        p, s = llmkit.ops.quantize_nf4(torch.randn(4, 64))
        assert llmkit.ops.nf4_linear(torch.randn(0, 64), p, s).shape == (0, 4)
        g = torch.ops.llmkit.nf4_linear_grad_input(torch.randn(0, 4), *nf4_op_args(p, s))
        assert g.shape == (0, 64)""", "ok"),
    "quantize_8bit_empty": ("llmkit.ops.quantize_blockwise_8bit(torch.randn(0))", ("ValueError", "empty")),
    # ---- gelu, cross-entropy
    "gelu_empty": ("""
        x = torch.randn(0, 5, requires_grad=True)
        y = llmkit.ops.gelu_tanh(x)
        y.sum().backward()
        assert y.shape == (0, 5) and x.grad.shape == (0, 5)""", "ok"),
    "cross_entropy_no_rows": ("""
        assert llmkit.ops.cross_entropy_fused_(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)""",
                              "ok"),
    "cross_entropy_empty_vocabulary": ("""
        llmkit.ops.cross_entropy_fused_(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))""",
                                       ("ValueError", "vocabulary is empty")),
    # ---- attention: empty batch / sequences give 0 and lse -inf; no heads or head_dim 0 are rejected
    "attention_empty_batch_and_sequences": ("""
        for qs, ks in [((0, 4, 2, 8), (0, 4, 2, 8)), ((1, 0, 2, 8), (1, 4, 2, 8)), ((1, 3, 2, 8), (1, 0, 2, 8))]:
            q, k, v = (torch.randn(s, requires_grad=True) for s in (qs, ks, ks))
            out, lse = llmkit.ops.flash_attention(q, k, v, return_lse=True)
            ref_out, ref_lse = R.flash_attention(q, k, v, return_lse=True)
            assert torch.equal(out, ref_out.float()) and torch.equal(lse, ref_lse.float())
            out.sum().backward()
            assert all(t.grad.shape == t.shape and not t.grad.any() for t in (q, k, v))""", "ok"),
    "attention_no_heads": ("""
        q = torch.randn(1, 3, 0, 8)
        llmkit.ops.flash_attention(q, q, q)""", ("ValueError", "heads")),
    "attention_head_dim_0": ("""
        q = torch.randn(1, 3, 2, 0)
        llmkit.ops.flash_attention(q, q, q)""", ("ValueError", "head_dim must be a multiple of 8")),
    "attention_head_dim_0_raw": ("""
        q = torch.randn(1, 3, 2, 0)
        torch.ops.llmkit.flash_attention_forward(q, q, q, None, None, 3, 3, 1.0, -1, -1, None)""",
                                 ("ValueError", "head_dim must be a multiple of 8")),
    "varlen_empty_cu_seqlens": ("""
        q = torch.randn(3, 2, 8)
        cu = torch.zeros(0, dtype=torch.int32)
        llmkit.ops.flash_attention_varlen(q, q, q, cu, cu, 3, 3)""", ("ValueError", "batch \\+ 1 entries")),
    "varlen_no_rows_and_empty_sequences": ("""
        q = torch.randn(0, 2, 8, requires_grad=True)
        cu = torch.zeros(3, dtype=torch.int32)
        out = llmkit.ops.flash_attention_varlen(q, q, q, cu, cu, 0, 0)
        out.sum().backward()
        assert out.shape == (0, 2, 8) and q.grad.shape == (0, 2, 8)""", "ok"),
    # ---- another device: a meta tensor among CPU ones used to return uninitialised memory
    "varlen_meta_cu_seqlens": ("""
        q = torch.randn(6, 2, 8)
        cu = torch.tensor([0, 3, 6], dtype=torch.int32, device="meta")
        llmkit.ops.flash_attention_varlen(q, q, q, cu, cu, 3, 3)""", ("ValueError", "cu_seqlens_q is on meta")),
    "varlen_meta_cu_seqlens_raw": ("""
        q = torch.randn(6, 2, 8)
        cu = torch.tensor([0, 3, 6], dtype=torch.int32, device="meta")
        torch.ops.llmkit.flash_attention_forward(q, q, q, cu, cu, 3, 3, 1.0, -1, -1, None)""",
                                   ("ValueError", "cu_seqlens_q is on meta")),
    "attention_meta_bias": ("""
        q = torch.randn(1, 3, 2, 8)
        llmkit.ops.flash_attention(q, q, q, attn_bias=torch.zeros(1, 1, 3, 3, device="meta"))""",
                            ("ValueError", "attn_bias is on meta")),
    "attention_meta_bias_raw": ("""
        q = torch.randn(1, 3, 2, 8)
        torch.ops.llmkit.flash_attention_forward(q, q, q, None, None, 3, 3, 1.0, -1, -1, None,
                                                 torch.zeros(1, 1, 3, 3, device="meta"))""",
                                ("ValueError", "attn_bias is on meta")),
    "attention_meta_global_tokens": ("""
        q = torch.randn(1, 3, 2, 8)
        llmkit.ops.flash_attention(q, q, q, global_tokens=torch.zeros(1, 3, dtype=torch.bool, device="meta"))""",
                                     ("ValueError", "global_tokens is on meta")),
    "attention_backward_meta_lse_raw": ("""
        q = torch.randn(1, 3, 2, 8)
        out, lse = torch.ops.llmkit.flash_attention_forward(q, q, q, None, None, 3, 3, 1.0, -1, -1, None)
        torch.ops.llmkit.flash_attention_backward(out, q, q, q, out, lse.to("meta"), None, None, 3, 3, 1.0, -1, -1,
                                                  None, True)""", ("ValueError", "lse is on meta")),
    "gemv_meta_weight": ("llmkit.ops.linear_gemv(torch.randn(1, 3), torch.randn(4, 3, device='meta'))",
                         ("ValueError", "weight is on meta")),
    "gemv_meta_bias_raw": ("""
        torch.ops.llmkit.linear_gemv(torch.randn(1, 3), torch.randn(4, 3), torch.randn(4, device="meta"))""",
                           ("ValueError", "bias is on meta")),
    "cross_entropy_meta_targets_raw": ("""
        torch.ops.llmkit.cross_entropy_fused_(torch.randn(2, 3), torch.zeros(2, dtype=torch.long, device="meta"),
                                              -100, 1.0, True)""", ("ValueError", "targets is on meta")),
    "cross_entropy_meta_targets": ("""
        llmkit.ops.cross_entropy_fused_(torch.randn(2, 3), torch.zeros(2, dtype=torch.long, device="meta"))""",
                                   ("ValueError", "targets is on meta")),
    "lora_meta_bias_raw": ("""
        torch.ops.llmkit.lora_linear(torch.randn(2, 3), torch.randn(4, 3), None, None, 64, [], None, None, None,
                                     256, torch.randn(4, device="meta"), torch.randn(2, 3), torch.randn(4, 2), 1.0,
                                     0.0, torch.tensor(0))""", ("ValueError", "bias is on meta")),
    "lora_meta_weight": ("""
        llmkit.ops.lora_linear(torch.randn(2, 3), torch.randn(4, 3, device="meta"), None, torch.randn(2, 3),
                               torch.randn(4, 2), 1.0)""", ("ValueError", "is on meta")),
    "gelu_backward_meta_grad_raw": ("""
        torch.ops.llmkit.gelu_tanh_backward(torch.randn(3, device="meta"), torch.randn(3))""",
                                    ("ValueError", "grad is on meta")),
    "nf4_linear_meta_bias_raw": ("""
        p, s = llmkit.ops.quantize_nf4(torch.randn(4, 64))
        torch.ops.llmkit.nf4_linear(torch.randn(2, 64), *nf4_op_args(p, s), torch.randn(4, device="meta"))""",
                                 ("ValueError", "bias is on meta")),
    "dequantize_into_meta_out_raw": ("""
        p, s = llmkit.ops.quantize_nf4(torch.randn(4, 64))
        torch.ops.llmkit.dequantize_nf4_into(p, s.absmax, 64, [4, 64], torch.float32,
                                             out=torch.empty(4, 64, device="meta"))""",
                                     ("ValueError", "out is on meta")),
    "quantize_8bit_meta_code_raw": ("""
        torch.ops.llmkit.quantize_blockwise_8bit(torch.randn(300), torch.zeros(256, device="meta"), 256)""",
                                    ("ValueError", "code is on meta")),
    # ---- outputs that share memory with an input
    "dequantize_into_out_overlaps_packed": ("""
        p, s = llmkit.ops.quantize_nf4(torch.randn(4, 64))
        out = torch.empty(4, 64)
        packed_view = out.view(-1).view(torch.uint8)[:128].view(128, 1)
        packed_view.copy_(p)
        torch.ops.llmkit.dequantize_nf4_into(packed_view, s.absmax, 64, [4, 64], torch.float32, out=out)""",
                                            ("ValueError", "shares memory with packed")),
    "dequantize_out_overlaps_absmax": ("""
        p, s = llmkit.ops.quantize_nf4(torch.randn(4, 64))
        out = torch.empty(4, 64)
        out.view(-1)[:4].copy_(s.absmax)
        s.absmax = out.view(-1)[:4]
        llmkit.ops.dequantize_nf4(p, s, out=out)""", ("ValueError", "shares memory with absmax")),
    "cross_entropy_logits_overlap_targets": ("""
        buf = torch.zeros(8, dtype=torch.int64)
        logits = buf.view(torch.float32).view(4, 4)
        llmkit.ops.cross_entropy_fused_(logits, buf[:4])""", ("ValueError", "share memory")),
}

_CHILD = r"""
import json, sys, textwrap, traceback
import torch, torch.nn.functional as F
import llmkit, llmkit.ops
from llmkit.ops import reference as R
from llmkit.ops.quant import nf4_op_args
for name, code in json.load(sys.stdin):
    print("BEGIN " + name, flush=True)
    try:
        exec(textwrap.dedent(code), {"torch": torch, "F": F, "llmkit": llmkit, "R": R, "nf4_op_args": nf4_op_args})
        result = {"ok": True}
    except BaseException as e:
        result = {"exc": type(e).__name__, "msg": str(e)[-2000:], "where": traceback.format_exc()[-1500:]}
    print("RESULT " + json.dumps([name, result]), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes():
    """name -> outcome of every case; a case that kills the child records its exit status
    (negative: the signal) and the child restarts on the next case."""
    results, todo = {}, list(CASES)
    while todo:
        payload = json.dumps([[name, CASES[name][0]] for name in todo])
        run = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, text=True,
                             timeout=600)
        current = None
        for line in run.stdout.splitlines():
            if line.startswith("BEGIN "):
                current = line[len("BEGIN "):]
            elif line.startswith("RESULT "):
                name, result = json.loads(line[len("RESULT "):])
                results[name] = result
                current = None
        if current is not None:  # died inside a case
            results[current] = {"crash": run.returncode, "stderr": run.stderr[-2000:]}
        elif run.returncode != 0 and len(results) < len(CASES):
            pytest.fail(f"the case runner failed before any case: {run.stderr[-3000:]}")
        todo = [name for name in CASES if name not in results]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_case(outcomes, name):
    import re

    expected = CASES[name][1]
    got = outcomes[name]
    assert "crash" not in got, f"{name} killed the process (exit status {got['crash']}): {got['stderr']}"
    if expected == "ok":
        assert got.get("ok"), f"{name} raised {got.get('exc')}: {got.get('msg')}\n{got.get('where')}"
    else:
        exc, pattern = expected
        assert not got.get("ok"), f"{name} ran without raising; expected {exc} matching {pattern!r}"
        assert got["exc"] == exc and re.search(pattern, got["msg"]), \
            f"{name}: expected {exc} matching {pattern!r}, got {got['exc']}: {got['msg']}"


# ----------------------------------------------------- trainer threads --

_THREADS = r"""
import resource, sys, torch, llmkit

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

vocab, dim = 50, 8
ids = torch.randint(0, vocab, (5000,), dtype=torch.int32)
offsets = torch.tensor([0, 2500, 5000], dtype=torch.int64)
keep = torch.full((vocab,), -1, dtype=torch.int32)
cum = ((torch.arange(1, vocab + 1, dtype=torch.float64) / vocab) * (2**31 - 1)).to(torch.int32)
syn0, syn1 = torch.rand(vocab, dim) - 0.5, torch.zeros(vocab, dim)
args = (syn0, syn1, ids, offsets, keep, cum, 3, 2, 0.025, 0.0001)
llmkit._C.word2vec.train_chunk(*args, workers=2, seed=1)  # works before the limit
rows, cols, values = llmkit._C.glove.count_cooccurrences(ids, offsets, vocab, 3, workers=2)
before = syn0.clone()
# Room for a few thread stacks (8 MiB each), not for 1000: thread creation fails part way.
limit = vm_bytes() + (64 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for name, call in [
    ("word2vec", lambda: llmkit._C.word2vec.train_chunk(*args, workers=1000, seed=1)),
    ("glove", lambda: llmkit._C.glove.train_epoch(torch.zeros(vocab, dim + 1), torch.zeros(vocab, dim + 1),
                                                  torch.ones(vocab, dim + 1), torch.ones(vocab, dim + 1),
                                                  rows, cols, values, workers=1000)),
]:
    try:
        call()
    except RuntimeError as e:
        assert "worker threads" in str(e) and "lower `workers`" in str(e), str(e)
        print(name, "raised:", e, flush=True)
    else:
        raise AssertionError(name + " did not raise under the address-space limit")
assert torch.equal(syn0, before), "a worker trained although the run was abandoned"
print("ok")
"""


def test_trainers_raise_when_threads_cannot_start():
    """workers=1000 under an address-space limit: the system refuses a thread part way; the
    trainers join the threads they started and raise RuntimeError (it was an abort)."""
    run = subprocess.run([sys.executable, "-c", _THREADS], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), \
        f"exit status {run.returncode}\nstdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-3000:]}"
    assert "word2vec raised" in run.stdout and "glove raised" in run.stdout

