"""flash_attention's additive bias (attn_bias) against the float64 reference:
forward, lse, and the gradients of q, k, v and the bias (reduced over its
broadcast dimensions), for every bias shape, with causal / window / global
masks on top, -inf entries, GQA, odd sizes and low precision; opcheck,
torch.compile, bad input."""

import pytest
import torch
from compile_check import assert_compiled_matches_eager

from llmkit.ops import flash_attention, flash_attention_varlen
from llmkit.ops import reference as R

# Max error relative to the reference's largest magnitude (floored at 1), as
# in test_attention.py.
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item() if ref.numel() else 0.0


def randn(*shape, dtype=torch.float32, device="cpu", generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def bias_shape(kind: str, batch: int, heads: int, sq: int, sk: int) -> tuple[int, ...]:
    return {"1H": (1, heads, sq, sk), "B1": (batch, 1, sq, sk), "BH": (batch, heads, sq, sk),
            "11": (1, 1, sq, sk)}[kind]


def skip_unless_cpu(device):
    if device != "cpu":
        pytest.skip("attn_bias has CPU kernels only (CUDA raises NotImplementedError, tested below)")


def run_both(q, k, v, bias, **kw):
    """(out, lse, dq, dk, dv, dbias) of the kernel and of the float64 reference."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    out, lse = flash_attention(*leaves[:3], return_lse=True, attn_bias=leaves[3], **kw)
    ref_out, ref_lse = R.flash_attention(*ref_leaves[:3], return_lse=True, attn_bias=ref_leaves[3], **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    return (out, lse, *grads), (ref_out, ref_lse, *ref_grads)


def assert_close_to_reference(ours, ref, dtype):
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        if name == "lse":
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a).cpu(), finite.cpu()), "lse: -inf exactly where a query sees no key"
            assert (a[~finite] == float("-inf")).all()
            err = rel_err(a[finite], b[finite]) if finite.any() else 0.0
            assert err <= 1e-5, f"lse error {err:.2e}"
            continue
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        bound = BOUNDS[dtype]
        err = rel_err(a, b)
        assert err <= bound, f"{name}: error {err:.2e} > {bound:.0e}"


CASES = [
    # batch, sq, sk, hq, hk, d, bias kind, mask kwargs
    (2, 37, 53, 4, 4, 24, "1H", {}),
    (2, 37, 53, 4, 2, 64, "B1", {}),
    (3, 53, 37, 2, 1, 24, "BH", {}),
    (2, 37, 37, 3, 3, 64, "11", {}),
    (2, 37, 53, 4, 2, 24, "1H", {"causal": True}),
    (2, 53, 37, 2, 2, 64, "BH", {"causal": True}),  # sq > sk: the first rows see no key
    (1, 300, 300, 2, 2, 32, "1H", {"window": (40, 17)}),
    (2, 70, 70, 2, 2, 32, "BH", {"window": (5, 5), "global_tokens": "some"}),
    (1, 280, 300, 2, 1, 16, "B1", {"causal": True, "softmax_scale": 0.5}),
]


SEED_OFFSET = 0  # fixed, reproducible inputs; offsets 0, 3, 7, 11, 13, 17, 19 all pass the bounds


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}_sq{c[1]}_sk{c[2]}_h{c[3]}x{c[4]}_d{c[5]}_{c[6]}_"
                         + "_".join(sorted(c[7])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(case, dtype, device):
    skip_unless_cpu(device)
    batch, sq, sk, hq, hk, d, kind, kw = case
    g = torch.Generator().manual_seed(CASES.index(case) + SEED_OFFSET)
    q = randn(batch, sq, hq, d, dtype=dtype, device=device, generator=g)
    k, v = (randn(batch, sk, hk, d, dtype=dtype, device=device, generator=g) for _ in range(2))
    # Biases of the size T5's relative positions reach (a few units).
    bias = 2 * randn(*bias_shape(kind, batch, hq, sq, sk), device=device, generator=g)
    kw = dict(kw)
    if kw.get("global_tokens") == "some":
        glob = torch.zeros(batch, sq, dtype=torch.bool, device=device)
        glob[:, [0, 33]] = True
        kw["global_tokens"] = glob
    ours, ref = run_both(q, k, v, bias, **kw)
    assert_close_to_reference(ours, ref, dtype)


def test_neg_inf_entries_hide_keys(device):
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(3)
    batch, sq, sk, h, d = 2, 37, 53, 2, 24
    q = randn(batch, sq, h, d, generator=g)
    k, v = (randn(batch, sk, h, d, generator=g) for _ in range(2))
    bias = randn(batch, 1, sq, sk, generator=g)
    bias[torch.rand(bias.shape, generator=g) < 0.3] = float("-inf")  # scattered hidden keys
    bias[0, 0, 5, :] = float("-inf")  # query 5 of sequence 0 sees nothing
    bias[1, 0, :, 40:] = float("-inf")  # padding: keys 40.. of sequence 1
    ours, ref = run_both(q, k, v, bias, causal=True)
    assert_close_to_reference(ours, ref, torch.float32)
    out, lse, dq, dk, dv, dbias = ours
    assert (out[0, 5] == 0).all() and (lse[0, :, 5] == float("-inf")).all()
    assert (dq[0, 5] == 0).all() and (dbias[0, 0, 5] == 0).all()
    assert (dbias[bias == float("-inf")] == 0).all()


def test_padding_bias_equals_dropping_padded_keys(device):
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(4)
    q = randn(1, 29, 2, 32, generator=g)
    k, v = (randn(1, 41, 2, 32, generator=g) for _ in range(2))
    rel = randn(1, 2, 29, 41, generator=g)
    padded = rel.clone()
    padded[..., 30:] = float("-inf")
    full = flash_attention(q, k, v, softmax_scale=1.0, attn_bias=padded)
    cut = flash_attention(q, k[:, :30], v[:, :30], softmax_scale=1.0, attn_bias=rel[..., :30].contiguous())
    torch.testing.assert_close(full, cut, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bias_dtypes(bias_dtype, device):
    """Any float bias dtype is used in float32; its gradient comes back in its dtype."""
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(5)
    q, k, v = (randn(2, 19, 2, 16, generator=g) for _ in range(3))
    bias = randn(1, 2, 19, 19, generator=g).to(bias_dtype).requires_grad_()
    out = flash_attention(q, k, v, causal=True, attn_bias=bias)
    ref = R.flash_attention(q, k, v, causal=True, attn_bias=bias.detach().double())
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    assert bias.grad.dtype == bias_dtype and bias.grad.shape == bias.shape


def test_strided_and_expanded_bias(device):
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(8)
    q, k, v = (randn(2, 23, 2, 16, generator=g) for _ in range(3))
    base = randn(1, 1, 23, 23, generator=g)
    dense = base.expand(2, 2, 23, 23).contiguous()
    expected = flash_attention(q, k, v, attn_bias=dense)
    torch.testing.assert_close(flash_attention(q, k, v, attn_bias=base.expand(2, 2, 23, 23)), expected)
    # Key dimension not contiguous (a transpose): copied, same answer.
    transposed = dense.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(flash_attention(q, k, v, attn_bias=transposed), expected)
    # Padding mask broadcast over queries via a zero row stride.
    pad = torch.zeros(2, 1, 1, 23)
    pad[1, ..., 17:] = float("-inf")
    torch.testing.assert_close(flash_attention(q, k, v, attn_bias=pad.expand(2, 1, 23, 23)),
                               flash_attention(q, k, v, attn_bias=pad.expand(2, 1, 23, 23).contiguous()))


def test_bias_without_grad_leaves_qkv_grads_right(device):
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(9)
    q, k, v = (randn(1, 31, 2, 16, generator=g).requires_grad_() for _ in range(3))
    bias = randn(1, 2, 31, 31, generator=g)  # a constant bias: no dbias computed
    flash_attention(q, k, v, attn_bias=bias).sum().backward()
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    R.flash_attention(rq, rk, rv, attn_bias=bias.double()).sum().backward()
    for ours, ref in ((q, rq), (k, rk), (v, rv)):
        assert rel_err(ours.grad, ref.grad) < 1e-5


def test_opcheck(device):
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(1)
    q = randn(2, 37, 4, 32, generator=g).requires_grad_()
    k, v = (randn(2, 41, 2, 32, generator=g).requires_grad_() for _ in range(2))
    op = torch.ops.llmkit.flash_attention_forward.default
    for shape in ((1, 4, 37, 41), (2, 1, 37, 41), (2, 4, 37, 41)):
        bias = randn(*shape, generator=g).requires_grad_()
        torch.library.opcheck(op, (q, k, v, None, None, 37, 41, 0.2, -1, 0, None, bias))
    bias16 = randn(1, 4, 37, 41, generator=g).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(op, (q, k, v, None, None, 37, 41, 0.2, 10, 3, None, bias16))
    out, lse = op(q.detach(), k.detach(), v.detach(), None, None, 37, 41, 0.2, -1, 0, None, bias.detach())
    backward = torch.ops.llmkit.flash_attention_backward.default
    for needs_grad in (True, False):
        torch.library.opcheck(backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                         None, None, 37, 41, 0.2, -1, 0, None, True, bias.detach(), needs_grad))


def test_torch_compile_fullgraph(device):
    skip_unless_cpu(device)
    g = torch.Generator().manual_seed(6)
    q, k, v = (randn(1, 45, 2, 32, generator=g) for _ in range(3))
    bias = randn(1, 2, 45, 45, generator=g)

    def loss(q, k, v, bias):
        return flash_attention(q, k, v, causal=True, attn_bias=bias).square().sum()

    assert_compiled_matches_eager(loss, q, k, v, bias)


def test_cuda_says_not_implemented():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q, k, v = (torch.randn(1, 8, 2, 32, device="cuda") for _ in range(3))
    with pytest.raises(NotImplementedError, match="attn_bias"):
        flash_attention(q, k, v, attn_bias=torch.zeros(1, 2, 8, 8, device="cuda"))


# ---------------------------------------------------------------- bad input --

def _qkv(sq=8, sk=8):
    return torch.randn(2, sq, 2, 32), torch.randn(2, sk, 2, 32), torch.randn(2, sk, 2, 32)


@pytest.mark.parametrize(
    "bias,exc,match",
    [
        (torch.zeros(2, 8, 8), ValueError, "batch or 1, heads_q or 1, seqlen_q, seqlen_k"),
        (torch.zeros(3, 2, 8, 8), ValueError, "got \\[3, 2, 8, 8\\]"),
        (torch.zeros(2, 3, 8, 8), ValueError, "heads_q or 1"),
        (torch.zeros(2, 2, 7, 8), ValueError, "seqlen_q"),
        (torch.zeros(2, 2, 8, 1), ValueError, "seqlen_k"),
        (torch.zeros(2, 2, 8, 8, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(2, 2, 8, 8, dtype=torch.bool), TypeError, "masked_fill"),
        ([[0.0]], TypeError, "tensor or None"),
    ],
)
def test_bad_bias(bias, exc, match):
    with pytest.raises(exc, match=match):
        flash_attention(*_qkv(), attn_bias=bias)


def test_bad_bias_at_the_op_level():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.llmkit.flash_attention_forward(q, k, v, None, None, 8, 8, 0.2, -1, -1, None,
                                                 torch.zeros(1, 1, 8, 8, dtype=torch.int32))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed sequences"):
        torch.ops.llmkit.flash_attention_forward(q[0], k[0], v[0], cu, cu, 8, 8, 0.2, -1, -1, None,
                                                 torch.zeros(1, 2, 8, 8))


def test_varlen_rejects_bias():
    q, k, v = (t[0] for t in _qkv())
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="not supported for packed sequences"):
        flash_attention_varlen(q, k, v, cu, cu, 8, 8, attn_bias=torch.zeros(1, 2, 8, 8))


def test_bias_on_another_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="device"):
        flash_attention(*_qkv(), attn_bias=torch.zeros(2, 2, 8, 8, device="cuda"))
