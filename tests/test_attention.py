"""Flash attention kernels against the float64 reference (llmkit.ops.reference):
forward, logsumexp and every gradient; windows, causal (bottom-right),
global tokens, GQA, sq != sk, varlen with empty sequences; strided inputs;
determinism; opcheck, torch.compile; bad input."""

import os
import subprocess
import sys

import pytest
import torch
from compile_check import assert_compiled_matches_eager

from llmkit.ops import flash_attention, flash_attention_varlen
from llmkit.ops import reference as R

# Max error relative to the reference's largest magnitude (floored at 1, so a
# gradient that is exactly 0 in theory is held to an absolute bound).
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item() if ref.numel() else 0.0


def randn(*shape, dtype, device, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def run_both(q, k, v, varlen=None, **kw):
    """(out, lse, dq, dk, dv) of the kernel and of the reference (float64)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    if varlen is None:
        out, lse = flash_attention(*leaves, return_lse=True, **kw)
        ref_out, ref_lse = R.flash_attention(*ref_leaves, return_lse=True, **kw)
    else:
        cu_q, cu_k, mq, mk = varlen
        out, lse = flash_attention_varlen(*leaves, cu_q, cu_k, mq, mk, return_lse=True, **kw)
        ref_out, ref_lse = R.flash_attention_varlen(*ref_leaves, cu_q.cpu(), cu_k.cpu(), return_lse=True, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    return (out, lse, *grads), (ref_out, ref_lse, *ref_grads)


def assert_close_to_reference(ours, ref, dtype):
    bound = BOUNDS[dtype]
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.isfinite(a).all() or name == "lse", f"{name} has non-finite values"
        if name == "lse":
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a).cpu(), finite.cpu()), "lse: -inf where a query sees no key"
            assert (a[~finite] == float("-inf")).all()
            err = rel_err(a[finite], b[finite]) if finite.any() else 0.0
            assert err <= 1e-5, f"lse error {err:.2e}"  # lse is always float32
        else:
            err = rel_err(a, b)
            assert err <= bound, f"{name}: error {err:.2e} > {bound:.0e}"


CASES = [
    # (batch, sq, sk, hq, hk, d, causal, window)
    (2, 17, 17, 4, 4, 64, False, (-1, -1)),
    (1, 1, 1, 1, 1, 32, False, (-1, -1)),
    (1, 1, 333, 2, 1, 64, True, (-1, -1)),  # decode: one query, bottom-right causal
    (1, 333, 333, 4, 2, 32, True, (-1, -1)),
    (2, 100, 333, 3, 1, 96, True, (-1, -1)),  # sq < sk
    (1, 333, 100, 4, 1, 64, True, (-1, -1)),  # sq > sk: the first rows see nothing
    (1, 1000, 1000, 2, 2, 64, True, (-1, -1)),
    (1, 1000, 1000, 2, 1, 64, False, (64, 64)),
    (1, 333, 333, 2, 2, 128, False, (0, 0)),
    (1, 333, 333, 2, 2, 64, False, (1, 1)),
    (1, 333, 333, 2, 2, 64, True, (64, -1)),  # causal sliding window (Mistral)
    (1, 200, 150, 2, 2, 64, False, (5, 17)),
    (1, 100, 100, 2, 2, 256, False, (500, 500)),  # window wider than the sequence
    (2, 17, 333, 8, 2, 128, False, (3, 0)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-sq{}-sk{}-h{}x{}-d{}-c{}-w{}_{}".format(*c[:7], *c[7]))
def test_matches_reference_fp32(device, case):
    b, sq, sk, hq, hk, d, causal, window = case
    g = torch.Generator().manual_seed(sq * 31 + sk)
    q = randn(b, sq, hq, d, dtype=torch.float32, device=device, generator=g)
    k = randn(b, sk, hk, d, dtype=torch.float32, device=device, generator=g)
    v = randn(b, sk, hk, d, dtype=torch.float32, device=device, generator=g)
    ours, ref = run_both(q, k, v, causal=causal, window=window)
    assert_close_to_reference(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[7], CASES[11]], ids=lambda c: f"sq{c[1]}-sk{c[2]}-w{c[7]}")
def test_matches_reference_half(device, dtype, case):
    b, sq, sk, hq, hk, d, causal, window = case
    g = torch.Generator().manual_seed(5)
    q = randn(b, sq, hq, d, dtype=dtype, device=device, generator=g)
    k = randn(b, sk, hk, d, dtype=dtype, device=device, generator=g)
    v = randn(b, sk, hk, d, dtype=dtype, device=device, generator=g)
    ours, ref = run_both(q, k, v, causal=causal, window=window)
    assert ours[0].dtype == dtype and all(t.dtype == dtype for t in ours[2:])
    assert_close_to_reference(ours, ref, dtype)


@pytest.mark.parametrize("hq,hk", [(6, 6), (6, 3), (6, 2), (6, 1)])
def test_every_gqa_ratio(device, hq, hk):
    g = torch.Generator().manual_seed(hq * 10 + hk)
    q = randn(2, 70, hq, 32, dtype=torch.float32, device=device, generator=g)
    k = randn(2, 90, hk, 32, dtype=torch.float32, device=device, generator=g)
    v = randn(2, 90, hk, 32, dtype=torch.float32, device=device, generator=g)
    ours, ref = run_both(q, k, v, causal=True)
    assert_close_to_reference(ours, ref, torch.float32)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256, 40])
def test_head_dims(device, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (randn(1, 77, 2, head_dim, dtype=torch.float32, device=device, generator=g) for _ in range(3))
    ours, ref = run_both(q, k, v, window=(20, 3))
    assert_close_to_reference(ours, ref, torch.float32)


def _global_mask(batch, seqlen, where, device):
    g = torch.zeros(batch, seqlen, dtype=torch.bool)
    if where == "start":
        g[:, 0] = True
    elif where == "end":
        g[:, -1] = True
    else:  # scattered, different per sequence, incl. neighbours
        g[0, [3, 100, 101, 250]] = True
        g[-1, [0, 77, seqlen - 1]] = True
    return g.to(device)


@pytest.mark.parametrize("where", ["start", "end", "scattered"])
@pytest.mark.parametrize("window", [(16, 16), (0, 0), (64, 64)])
def test_global_tokens(device, where, window):
    g = torch.Generator().manual_seed(11)
    q, k, v = (randn(2, 333, 2, 64, dtype=torch.float32, device=device, generator=g) for _ in range(3))
    glob = _global_mask(2, 333, where, device)
    ours, ref = run_both(q, k, v, window=window, global_tokens=glob)
    assert_close_to_reference(ours, ref, torch.float32)


def test_global_tokens_bf16_gqa(device):
    g = torch.Generator().manual_seed(12)
    q = randn(2, 300, 4, 64, dtype=torch.bfloat16, device=device, generator=g)
    k, v = (randn(2, 300, 2, 64, dtype=torch.bfloat16, device=device, generator=g) for _ in range(2))
    ours, ref = run_both(q, k, v, window=(32, 32), global_tokens=_global_mask(2, 300, "scattered", device))
    assert_close_to_reference(ours, ref, torch.bfloat16)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (8, 8))])
def test_varlen(device, causal, window):
    lens_q = [5, 0, 1, 130, 64, 17]
    lens_k = [7, 3, 0, 130, 64, 1]
    g = torch.Generator().manual_seed(3)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = randn(sum(lens_q), 4, 64, dtype=torch.float32, device=device, generator=g)
    k = randn(sum(lens_k), 2, 64, dtype=torch.float32, device=device, generator=g)
    v = randn(sum(lens_k), 2, 64, dtype=torch.float32, device=device, generator=g)
    ours, ref = run_both(q, k, v, varlen=(cu_q, cu_k, max(lens_q), max(lens_k)), causal=causal, window=window)
    assert_close_to_reference(ours, ref, torch.float32)


def test_varlen_global_tokens_bf16(device):
    lens = [40, 0, 1, 200]
    cu = torch.tensor([0, 40, 40, 41, 241], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(4)
    q, k, v = (randn(241, 2, 64, dtype=torch.bfloat16, device=device, generator=g) for _ in range(3))
    glob = torch.zeros(241, dtype=torch.bool)
    glob[[0, 40, 100, 240]] = True
    ours, ref = run_both(q, k, v, varlen=(cu, cu, max(lens), max(lens)), window=(8, 8),
                         global_tokens=glob.to(device))
    assert_close_to_reference(ours, ref, torch.bfloat16)


def test_varlen_equals_padded_batch(device):
    """Packing two sequences gives what each gives alone."""
    g = torch.Generator().manual_seed(9)
    a, b = (randn(1, n, 2, 64, dtype=torch.float32, device=device, generator=g) for n in (50, 90))
    packed = torch.cat([a[0], b[0]])
    cu = torch.tensor([0, 50, 140], dtype=torch.int32, device=device)
    out = flash_attention_varlen(packed, packed, packed, cu, cu, 90, 90, causal=True)
    torch.testing.assert_close(out[:50], flash_attention(a, a, a, causal=True)[0], rtol=0, atol=0)
    torch.testing.assert_close(out[50:], flash_attention(b, b, b, causal=True)[0], rtol=0, atol=0)


def test_varlen_rows_past_the_last_sequence_are_zero(device):
    q = torch.randn(10, 1, 32, device=device)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32, device=device)
    out, lse = flash_attention_varlen(q, q, q, cu, cu, 4, 4, return_lse=True)
    assert (out[7:] == 0).all() and (lse[:, 7:] == float("-inf")).all()


def test_strided_inputs_match_contiguous(device):
    """q/k/v as transposed views of (batch, heads, seqlen, head_dim), as HF models hold them."""
    g = torch.Generator().manual_seed(21)
    qt, kt, vt = (randn(2, 4, 129, 64, dtype=torch.float32, device=device, generator=g) for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (qt, kt, vt))
    assert not q.is_contiguous()
    ours, ref = run_both(q, k, v, causal=True)
    assert_close_to_reference(ours, ref, torch.float32)
    dense = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(flash_attention(q, k, v, causal=True), dense)


def test_softmax_scale(device):
    g = torch.Generator().manual_seed(2)
    q, k, v = (randn(1, 50, 2, 32, dtype=torch.float32, device=device, generator=g) for _ in range(3))
    ours, ref = run_both(q, k, v, softmax_scale=0.37)
    assert_close_to_reference(ours, ref, torch.float32)


def test_backward_is_deterministic(device):
    g = torch.Generator().manual_seed(8)
    q = randn(1, 700, 4, 64, dtype=torch.float32, device=device, generator=g).requires_grad_()
    k, v = (randn(1, 700, 1, 64, dtype=torch.float32, device=device, generator=g).requires_grad_() for _ in range(2))
    grads = []
    for _ in range(2):
        out = flash_attention(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_window_forward_does_not_depend_on_far_keys(device):
    """O(n * window): keys outside every window are never read (NaN there stays out)."""
    q, k, v = (torch.randn(1, 2048, 1, 64, device=device) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, 1500:] = float("nan")
    v2[:, 1500:] = float("nan")
    out = flash_attention(q, k2, v2, window=(100, 100))
    assert torch.isfinite(out[:, :1300]).all()
    torch.testing.assert_close(out[:, :1300], flash_attention(q, k, v, window=(100, 100))[:, :1300], rtol=0, atol=0)


def test_scalar_path_matches_reference():
    """LLMKIT_FORCE_SCALAR=1 runs the portable (non-AVX2) CPU code."""
    code = (
        "import torch; from llmkit.ops import flash_attention, reference as R\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 200, 2, 64, generator=g) for _ in range(3))\n"
        "glob = torch.zeros(1, 200, dtype=torch.bool); glob[0, 150] = True\n"
        "o = flash_attention(q, k, v, window=(20, 20), global_tokens=glob)\n"
        "r = R.flash_attention(q, k, v, window=(20, 20), global_tokens=glob)\n"
        "err = ((o.double() - r).abs().max() / r.abs().max()).item()\n"
        "assert err < 1e-5, err\nprint('ok', err)\n"
    )
    env = dict(os.environ, LLMKIT_FORCE_SCALAR="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_opcheck(device):
    g = torch.Generator().manual_seed(1)
    q = randn(2, 37, 4, 32, dtype=torch.float32, device=device, generator=g).requires_grad_()
    k, v = (randn(2, 41, 2, 32, dtype=torch.float32, device=device, generator=g).requires_grad_() for _ in range(2))
    op = torch.ops.llmkit.flash_attention_forward.default
    torch.library.opcheck(op, (q, k, v, None, None, 37, 41, 0.2, -1, 0, None))
    glob = torch.zeros(2, 37, dtype=torch.bool, device=device)
    glob[:, 5] = True
    q2, k2, v2 = (randn(2, 37, 2, 32, dtype=torch.bfloat16, device=device, generator=g).requires_grad_()
                  for _ in range(3))
    torch.library.opcheck(op, (q2, k2, v2, None, None, 37, 37, 0.2, 4, 4, glob))
    cu = torch.tensor([0, 10, 10, 37], dtype=torch.int32, device=device)
    qv, kv, vv = (randn(37, 2, 32, dtype=torch.float32, device=device, generator=g).requires_grad_() for _ in range(3))
    torch.library.opcheck(op, (qv, kv, vv, cu, cu, 27, 27, 0.2, -1, -1, None))
    out, lse = op(q.detach(), k.detach(), v.detach(), None, None, 37, 41, 0.2, -1, 0, None)
    torch.library.opcheck(torch.ops.llmkit.flash_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, None,
                           37, 41, 0.2, -1, 0, None, True))


def test_torch_compile_fullgraph(device):
    g = torch.Generator().manual_seed(6)
    q, k, v = (randn(1, 65, 2, 32, dtype=torch.float32, device=device, generator=g) for _ in range(3))

    def loss(q, k, v):
        return flash_attention(q, k, v, causal=True, window=(16, -1)).square().sum()

    assert_compiled_matches_eager(loss, q, k, v)


# ---------------------------------------------------------------- bad input --

def _qkv(shape=(1, 8, 2, 32), **kw):
    return [torch.randn(*shape, **kw) for _ in range(3)]


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: flash_attention(*_qkv((8, 2, 32))), ValueError, "4-D"),
        (lambda: flash_attention(torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64)),
         ValueError, "head_dim"),
        (lambda: flash_attention(torch.randn(1, 8, 3, 32), *_qkv()[:2]), ValueError, "multiple of the key/value heads"),
        (lambda: flash_attention(*_qkv((1, 8, 2, 36))), ValueError, "multiple of 8"),
        (lambda: flash_attention(*_qkv((1, 8, 2, 512))), ValueError, "up to 256"),
        (lambda: flash_attention(*_qkv(), window=(-2, 0)), ValueError, ">= -1"),
        (lambda: flash_attention(*_qkv(), window=5), TypeError, "pair"),
        (lambda: flash_attention(*_qkv(dtype=torch.float64)), TypeError, "float32, float16 or bfloat16"),
        (lambda: flash_attention(torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32).half(), torch.randn(1, 8, 2, 32)),
         TypeError, "one dtype"),
        (lambda: flash_attention(torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 9, 2, 32)),
         ValueError, "one shape"),
        (lambda: flash_attention(*_qkv(), softmax_scale=float("nan")), ValueError, "finite"),
        (lambda: flash_attention(*_qkv(), global_tokens=torch.zeros(1, 8)), TypeError, "bool"),
        (lambda: flash_attention(*_qkv(), global_tokens=torch.zeros(1, 9, dtype=torch.bool)),
         ValueError, "global_tokens"),
        (lambda: flash_attention(*_qkv(), causal=True, global_tokens=torch.zeros(1, 8, dtype=torch.bool)),
         ValueError, "causal"),
        (lambda: flash_attention(torch.randn(1, 8, 2, 32), *_qkv((1, 9, 2, 32))[:2],
                                 global_tokens=torch.zeros(1, 8, dtype=torch.bool)), ValueError, "self-attention"),
        (lambda: flash_attention_varlen(*_qkv((8, 2, 32)), torch.tensor([0, 5, 3, 8], dtype=torch.int32),
                                        torch.tensor([0, 5, 3, 8], dtype=torch.int32), 5, 5), ValueError, "decrease"),
        (lambda: flash_attention_varlen(*_qkv((8, 2, 32)), torch.tensor([0, 5, 8]), torch.tensor([0, 5, 8]), 5, 5),
         TypeError, "int32"),
        (lambda: flash_attention_varlen(*_qkv((8, 2, 32)), torch.tensor([1, 5, 8], dtype=torch.int32),
                                        torch.tensor([0, 5, 8], dtype=torch.int32), 5, 5), ValueError, "start at 0"),
        (lambda: flash_attention_varlen(*_qkv((8, 2, 32)), torch.tensor([0, 5, 9], dtype=torch.int32),
                                        torch.tensor([0, 5, 8], dtype=torch.int32), 5, 5), ValueError, "rows"),
        (lambda: flash_attention_varlen(*_qkv((8, 2, 32)), torch.tensor([0, 5, 8], dtype=torch.int32),
                                        torch.tensor([0, 5, 8], dtype=torch.int32), 4, 5), ValueError, "max_seqlen"),
        (lambda: flash_attention_varlen(*_qkv((8, 2, 32)), torch.tensor([0, 8], dtype=torch.int32),
                                        torch.tensor([0, 5, 8], dtype=torch.int32), 8, 8), ValueError, "one length"),
    ],
)
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
