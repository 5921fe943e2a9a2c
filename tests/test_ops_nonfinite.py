"""NaN and infinity through every op, against the float64 reference (and the
peers: bitsandbytes for NF4, torch's SDPA math path for attention): where a
value is NaN / inf, and that the rest is unchanged -- on the AVX2 kernels and
on the portable ones (LLMKIT_FORCE_SCALAR=1).

The rules (the reporter's silent wrong results of issue #17):
  * NF4 quantization keeps NaN / inf as bitsandbytes does: a NaN block has
    absmax NaN and codes 15, an inf block absmax inf, code 15 at the
    infinities and 7 elsewhere; dequantized, NaN / +inf come back.
  * flash attention: a NaN (or a score made inf - inf by a +inf query) at a
    visible pair makes that query's output and lse NaN, forward and
    backward; invisible pairs change nothing.
  * the fused cross-entropy: a row with a NaN has a NaN loss and gradient;
    +inf gives an infinite loss; ignored rows stay 0.
  * gelu_tanh, linear_gemv, nf4_linear, lora: NaN / inf propagate as in the
    reference formulas.
"""

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit.ops import cross_entropy_fused_, dequantize_nf4, flash_attention, quantize_nf4
from llmkit.ops import reference as R
from llmkit.ops.quant_state import NF4State
from peers import PeerCheck, same_values
from portable import run_portable

NAN, INF = float("nan"), float("inf")


def assert_same_nonfinite(got, ref, rtol=1e-5, atol=1e-5, what=""):
    """NaN where ref is NaN, +-inf where ref is +-inf, and close elsewhere."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, what
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN positions differ"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], ref[inf]), f"{what}: inf positions differ"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=rtol, atol=atol, msg=what)


# ------------------------------------------------------------------- NF4 --

def poisoned_weights(shape, dtype, blocksize, seed=0):
    """Random weights with: a NaN in block 1, +inf in block 2, -inf and +inf in block 3,
    NaN and inf together in block 4, and a NaN as the very last element (the partial block)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
    flat = w.view(-1)
    flat[1 * blocksize + 5] = NAN
    flat[2 * blocksize + 1] = INF
    flat[3 * blocksize + 7] = -INF
    flat[3 * blocksize + 8] = INF
    flat[4 * blocksize] = NAN
    flat[4 * blocksize + 3] = -INF
    flat[-1] = NAN
    return w.to(dtype)


def codes_of(packed, n):
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_quantize_keeps_nan_and_inf(dtype, blocksize):
    shape = (7, 3 * blocksize // 2 + 5)  # > 5 blocks, a partial last block
    w = poisoned_weights(shape, dtype, blocksize)
    packed, state = quantize_nf4(w, blocksize)
    packed_ref, state_ref = R.quantize_nf4(w, blocksize)
    assert torch.equal(packed, packed_ref)
    assert same_values(state.absmax, state_ref.absmax)
    # the rules, spelled out
    codes = codes_of(packed, w.numel()).view(-1)
    absmax = state.absmax
    assert absmax[1].isnan() and absmax[4].isnan() and absmax[-1].isnan()
    assert absmax[2] == INF and absmax[3] == INF
    assert torch.isfinite(absmax[[0, 5]]).all()
    for b in (1, 4):
        assert (codes[b * blocksize:(b + 1) * blocksize] == 15).all()
    block2 = codes[2 * blocksize:3 * blocksize]
    assert block2[1] == 15 and (block2[torch.arange(blocksize) != 1] == 7).all()
    # dequantized: NaN blocks NaN; inf blocks +inf at the infinities (sign lost, as bitsandbytes), NaN elsewhere
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = dequantize_nf4(packed, state, out_dtype)
        assert same_values(out, R.dequantize_nf4(packed, state, out_dtype))
        flat = out.view(-1).float()
        assert flat[blocksize:2 * blocksize].isnan().all()
        assert flat[3 * blocksize + 7] == INF and flat[3 * blocksize + 8] == INF
        assert flat[3 * blocksize].isnan()
        assert torch.isfinite(flat[:blocksize]).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_nan_inf_equal_bitsandbytes(double_quant):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    import bitsandbytes

    w = poisoned_weights((9, 100), torch.float32, 64, seed=3)
    packed, state = quantize_nf4(w, 64, compress_statistics=double_quant)
    packed_ref, state_ref = R.quantize_nf4(w, 64, double_quant)
    assert torch.equal(packed, packed_ref) and same_values(state.absmax, state_ref.absmax)
    expected = R.dequantize_nf4(packed, state)
    assert same_values(dequantize_nf4(packed, state), expected)
    peer = PeerCheck("bitsandbytes", bitsandbytes.__version__,
                     f"NaN / inf weights, blocksize 64, compress_statistics={double_quant}")
    packed_b, state_b = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    if peer.agrees("packed bytes", packed_b, packed_ref) and peer.agrees("absmax", state_b.absmax, state_ref.absmax):
        assert torch.equal(packed, packed_b) and same_values(state.absmax, state_b.absmax)
    if peer.agrees("dequantize_4bit", bnbF.dequantize_4bit(packed_b, state_b),
                   R.dequantize_nf4(packed_b, NF4State.from_bnb(state_b))):
        assert same_values(dequantize_nf4(packed_b, state_b), bnbF.dequantize_4bit(packed_b, state_b))
    peer.finish()


def test_nf4_nan_inf_portable_path():
    run_portable(
        "import torch, llmkit\n"
        "from llmkit.ops import quantize_nf4, dequantize_nf4, reference as R\n"
        "from peers import same_values\n"
        "from test_ops_nonfinite import poisoned_weights\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    w = poisoned_weights((7, 101), dt, 64)\n"
        "    for dq in (False, True):\n"
        "        p, s = quantize_nf4(w, 64, dq)\n"
        "        pr, sr = R.quantize_nf4(w, 64, dq)\n"
        "        assert torch.equal(p, pr) and same_values(s.absmax, sr.absmax)\n"
        "        for od in (torch.float32, torch.float16, torch.bfloat16):\n"
        "            assert same_values(dequantize_nf4(p, s, od), R.dequantize_nf4(p, s, od))\n"
        "print('ok')\n")


def test_nf4_linear_propagates_nan():
    w = torch.randn(16, 128)
    w[3, 70] = NAN  # the block of row 3, columns 64..127: output column 3 only
    packed, state = quantize_nf4(w, 64)
    for rows in (1, 5, 40):  # decode GEMV, tiles, chunks
        x = torch.randn(rows, 128)
        x[0, 2] = NAN
        got = llmkit.ops.nf4_linear(x, packed, state)
        assert_same_nonfinite(got, R.nf4_linear(x, packed, state), rtol=2e-5, atol=2e-5, what=f"rows {rows}")
        assert got[:, 3].isnan().all() and got[0].isnan().all() and torch.isfinite(got[1:, :3]).all()


# ------------------------------------------------------------- attention --

def attention_case(kind, causal):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 9, 9, generator=g)
    if kind == "q":
        q[0, 4, 1, 3] = NAN
    elif kind == "k":
        k[0, 6, 0, 0] = NAN
    elif kind == "v":
        v[0, 6, 1, 2] = NAN
    elif kind == "bias":
        bias[0, 1, 7, 2] = NAN
    elif kind == "inf_query":
        q[0, 3, 0] = INF
    elif kind == "bias_inf":
        bias[0, 0, 5, 5] = INF
    return q, k, v, bias


KINDS = ["q", "k", "v", "bias", "inf_query", "bias_inf"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_forward_propagates_like_softmax(kind, causal):
    q, k, v, bias = attention_case(kind, causal)
    out, lse = flash_attention(q, k, v, causal=causal, attn_bias=bias, return_lse=True)
    ref_out, ref_lse = R.flash_attention(q, k, v, causal=causal, attn_bias=bias, return_lse=True)
    if kind == "v" and causal:
        # The documented exception: V[6] (head 1, column 2) is NaN; rows 6.. see it and must be
        # NaN there; rows before may or may not get it through 0 * NaN (the reference's einsum
        # does). Everything else is exact.
        assert torch.isnan(out[0, 6:, 1, 2]).all()
        keep = torch.ones_like(out, dtype=torch.bool)
        keep[0, :, 1, 2] = False
        assert not torch.isnan(out[keep]).any()
        torch.testing.assert_close(out[keep].double(), ref_out[keep], rtol=1e-5, atol=1e-5)
    else:
        assert_same_nonfinite(out, ref_out, what="out")
    assert_same_nonfinite(lse, ref_lse, what="lse")
    assert torch.isnan(out).any()  # the case does reach the output
    if not causal:
        # torch's SDPA (math path, float64) agrees on where the NaNs are. Not with a causal
        # mask: SDPA adds a float mask, and NaN + -inf stays NaN, so a masked NaN leaks there.
        sdpa = F.scaled_dot_product_attention(
            q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2),
            attn_mask=bias.double()).transpose(1, 2)
        assert torch.equal(torch.isnan(out), torch.isnan(sdpa))


@pytest.mark.parametrize("kind", KINDS)
def test_attention_backward_propagates_like_softmax(kind):
    q, k, v, bias = attention_case(kind, causal=False)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, bias)]
    out = flash_attention(*leaves[:3], attn_bias=leaves[3])
    ref = R.flash_attention(*ref_leaves[:3], attn_bias=ref_leaves[3])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_same_nonfinite(a, b, rtol=1e-4, atol=1e-5, what=name)


@pytest.mark.parametrize("window", [(-1, -1), (100, 100)])  # key chunks of 256, and of 64 (windowed)
def test_attention_nan_and_inf_in_different_key_chunks(window):
    """lse is +inf for a +inf score alone, NaN when the row also holds a NaN, in whichever
    chunk of keys each falls (the kernel keeps a running max over chunks)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, 5, 1, 16, generator=g), torch.randn(1, 300, 1, 16, generator=g), \
        torch.randn(1, 300, 1, 16, generator=g)
    bias = torch.randn(1, 1, 5, 300, generator=g)
    bias[0, 0, 1, 200] = INF                                 # +inf alone
    bias[0, 0, 2, 150], bias[0, 0, 2, 290] = NAN, INF        # NaN in a chunk before the +inf
    bias[0, 0, 3, 190], bias[0, 0, 3, 295] = INF, NAN        # +inf before the NaN
    bias[0, 0, 4, 210] = NAN                                 # NaN alone
    out, lse = flash_attention(q, k, v, window=window, attn_bias=bias, return_lse=True)
    ref_out, ref_lse = R.flash_attention(q, k, v, window=window, attn_bias=bias, return_lse=True)
    assert_same_nonfinite(out, ref_out, what="out")
    assert_same_nonfinite(lse, ref_lse, what="lse")
    if window == (-1, -1):  # (with the window, row 2 does not see key 150: inf; the reference agrees)
        assert lse[0, 0, 1] == INF and lse[0, 0, 2:].isnan().all() and torch.isfinite(lse[0, 0, 0])


def test_attention_invisible_nan_changes_nothing():
    """A NaN key or bias entry that a query cannot see leaves that query exact."""
    q, k, v, bias = attention_case("k", causal=True)
    clean_k = k.clone()
    clean_k[0, 6, 0, 0] = 0.5
    poisoned = flash_attention(q, k, v, causal=True)
    clean = flash_attention(q, clean_k, v, causal=True)
    # the NaN is in key 6 of head 0: rows 6.. of head 0 see it, the rest is exact
    assert torch.equal(poisoned[0, :6], clean[0, :6]) and torch.equal(poisoned[0, :, 1], clean[0, :, 1])
    assert torch.isnan(poisoned[0, 6:, 0]).all()


def test_attention_portable_path():
    run_portable(
        "import torch\n"
        "from llmkit.ops import flash_attention, reference as R\n"
        "from test_ops_nonfinite import attention_case, assert_same_nonfinite, KINDS\n"
        "for kind in KINDS:\n"
        "    q, k, v, bias = attention_case(kind, False)\n"
        "    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]\n"
        "    refl = [t.double().requires_grad_() for t in (q, k, v, bias)]\n"
        "    out = flash_attention(*leaves[:3], attn_bias=leaves[3])\n"
        "    ref = R.flash_attention(*refl[:3], attn_bias=refl[3])\n"
        "    assert_same_nonfinite(out, ref, what=kind)\n"
        "    g = torch.ones_like(out)\n"
        "    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, refl, g.double())):\n"
        "        assert_same_nonfinite(a, b, rtol=1e-4, atol=1e-5, what=kind)\n"
        "print('ok')\n")


# ------------------------------------------------------------------ loss --

def loss_case():
    x = torch.randn(8, 37, generator=torch.Generator().manual_seed(2)) * 3
    x[0, 5] = NAN          # target elsewhere
    x[1, 9] = INF          # target elsewhere: loss inf
    x[2, 4] = INF          # target is the inf: loss NaN (inf - inf)
    x[3] = -INF            # no finite logit: NaN
    x[4, 0] = NAN          # ignored row: 0
    x[7, 1] = INF          # a NaN with a +inf: NaN (the max alone says inf)
    x[7, 30] = NAN
    t = torch.tensor([3, 2, 4, 1, -100, 6, 30, 0])
    return x, t


@pytest.mark.parametrize("compute_grad", [True, False])
def test_cross_entropy_nonfinite_rows(compute_grad):
    x, t = loss_case()
    ref_losses, ref_grad = R.cross_entropy_fused_(x, t, -100, 0.5, compute_grad)
    work = x.clone()
    losses = cross_entropy_fused_(work, t, -100, 0.5, compute_grad)
    assert_same_nonfinite(losses, ref_losses, rtol=2e-6, atol=2e-5, what="losses")
    assert losses[0].isnan() and losses[1] == INF and losses[2].isnan() and losses[3].isnan() and losses[4] == 0
    assert torch.isfinite(losses[5:7]).all() and losses[7].isnan()
    if compute_grad:
        assert_same_nonfinite(work, ref_grad, rtol=1e-5, atol=1e-7, what="gradient")
        assert work[:4].isnan().all() and (work[4] == 0).all() and work[7].isnan().all()


def test_cross_entropy_portable_path():
    run_portable(
        "import torch\n"
        "from llmkit.ops import cross_entropy_fused_, reference as R\n"
        "from test_ops_nonfinite import loss_case, assert_same_nonfinite\n"
        "x, t = loss_case(); w = x.clone()\n"
        "l = cross_entropy_fused_(w, t, -100, 0.5, True)\n"
        "rl, rg = R.cross_entropy_fused_(x, t, -100, 0.5, True)\n"
        "assert_same_nonfinite(l, rl, rtol=2e-6, atol=2e-5); assert_same_nonfinite(w, rg, rtol=1e-5, atol=1e-7)\n"
        "print('ok')\n")


def test_lm_head_loss_is_nan_for_a_nan_weight():
    """The reporter's case: a NaN in the LM head made the training loss 6.2; it must be NaN."""
    from llmkit.nn.loss import linear_cross_entropy

    x = torch.randn(6, 16)
    w = torch.randn(500, 16, requires_grad=True)
    with torch.no_grad():
        w[123, 4] = NAN
    loss = linear_cross_entropy(x, w, torch.randint(0, 500, (6,)))
    assert loss.isnan()
    loss.backward()
    assert w.grad.isnan().any()


# ------------------------------------------------------- elementwise ops --

SPECIALS = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1e30, -1e30, 3.5, -7.25, 1e-30])


def test_gelu_tanh_specials():
    x = torch.cat([SPECIALS, torch.randn(29)]).requires_grad_()  # 39: an AVX2 body and a scalar tail
    y = llmkit.ops.gelu_tanh(x)
    assert_same_nonfinite(y, R.gelu_tanh(x.detach()), rtol=1e-5, atol=1e-6, what="gelu")
    g = torch.randn(x.shape)
    (dx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(R.gelu_tanh(xr), xr, g.double())
    assert_same_nonfinite(dx, ref_dx, rtol=1e-5, atol=1e-6, what="gelu backward")


def test_gelu_tanh_specials_portable():
    run_portable(
        "import torch, llmkit\n"
        "from llmkit.ops import reference as R\n"
        "from test_ops_nonfinite import SPECIALS, assert_same_nonfinite\n"
        "x = torch.cat([SPECIALS, torch.randn(29)])\n"
        "assert_same_nonfinite(llmkit.ops.gelu_tanh(x), R.gelu_tanh(x), rtol=1e-5, atol=1e-6)\n"
        "print('ok')\n")


def test_linear_gemv_propagates_like_f_linear():
    x = torch.randn(3, 37)
    w = torch.randn(21, 37)
    x[1, 4] = NAN
    w[5, 30] = INF
    b = torch.randn(21)
    b[7] = NAN
    assert_same_nonfinite(llmkit.ops.linear_gemv(x, w, b), R.linear_gemv(x, w, b), rtol=1e-5, atol=1e-5)


def test_lora_dropout_keeps_dropped_nan():
    """torch's dropout multiplies by the mask: a dropped NaN stays NaN (0 * NaN), as the reference."""
    x = torch.randn(4, 64)
    x[:, 10] = NAN
    x[:, 11] = INF
    for p in (0.5, 0.9):
        out = llmkit.ops.lora_dropout(x, p, seed=7)
        assert_same_nonfinite(out, R.lora_dropout(x, p, 7), what=f"p={p}")
        assert out[:, 10].isnan().all()
