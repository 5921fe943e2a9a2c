"""flash-attn's call sites on llmkit: llmkit.ops.flash_attn_interface has
flash-attn 2.8's signatures (names, order, defaults), its call sites (copied
from flash-attn's README and docstrings) run unchanged and equal the float64
reference; llmkit's own flash_attention is keyword-only after v and takes
flash-attn's spellings; unsupported features raise NotImplementedError naming
the argument."""

import inspect
import math

import pytest
import torch

from llmkit.ops import flash_attention, flash_attention_varlen
from llmkit.ops import flash_attn_interface as fa
from llmkit.ops import reference as R

# flash-attn 2.8 (flash_attn/flash_attn_interface.py): (name, default) in order; inspect.Parameter.empty = required.
REQUIRED = inspect.Parameter.empty
_TAIL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
         ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED), *_TAIL],
    "flash_attn_qkvpacked_func": [("qkv", REQUIRED), *_TAIL],
    "flash_attn_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED), *_TAIL],
    "flash_attn_varlen_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED), ("cu_seqlens_q", REQUIRED),
                               ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED), ("max_seqlen_k", REQUIRED),
                               *_TAIL, ("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", REQUIRED), ("cu_seqlens", REQUIRED), ("max_seqlen", REQUIRED),
                                         *_TAIL],
    "flash_attn_varlen_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED), ("cu_seqlens_q", REQUIRED),
                                        ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED),
                                        ("max_seqlen_k", REQUIRED), *_TAIL],
}


def rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(b=2, sq=37, sk=37, hq=4, hk=2, d=32, dtype=torch.float32):
    return rnd(b, sq, hq, d, seed=1, dtype=dtype), rnd(b, sk, hk, d, seed=2, dtype=dtype), \
        rnd(b, sk, hk, d, seed=3, dtype=dtype)


def assert_matches(out, ref, bound=2e-5):
    assert out.shape == ref.shape
    err = ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
    assert err <= bound, err


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_signatures_are_flash_attn_s(name):
    params = inspect.signature(getattr(fa, name)).parameters
    got = [(p.name, p.default) for p in params.values()]
    assert got == FLASH_ATTN_SIGNATURES[name]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())


def test_readme_call_sites_run_unchanged():
    """flash-attn's README, verbatim: keyword calls with every default spelled out."""
    flash_attn_qkvpacked_func, flash_attn_func = fa.flash_attn_qkvpacked_func, fa.flash_attn_func
    q, k, v = qkv(hk=4)
    qkv_packed = torch.stack([q, k, v], dim=2)  # (batch, seqlen, 3, nheads, headdim)
    out = flash_attn_qkvpacked_func(qkv_packed, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), alibi_slopes=None, deterministic=False)
    assert_matches(out, R.flash_attention(q, k, v))
    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                          window_size=(-1, -1), alibi_slopes=None, deterministic=False)
    assert_matches(out, R.flash_attention(q, k, v))
    out = flash_attn_func(q, k, v, causal=True)  # flash-attn's shortest example
    assert_matches(out, R.flash_attention(q, k, v, causal=True))


def test_positional_call_in_flash_attn_order():
    """flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size): the fourth is dropout_p."""
    q, k, v = qkv(sq=20, sk=45)
    out = fa.flash_attn_func(q, k, v, 0.0, 0.3, True, (7, 0))
    assert_matches(out, R.flash_attention(q, k, v, causal=True, window=(7, 0), softmax_scale=0.3))


def test_flash_attention_is_keyword_only_after_v():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="positional"):
        flash_attention(q, k, v, True)  # flash-attn's order would read this as dropout_p
    cu = torch.tensor([0, 37], dtype=torch.int32)
    with pytest.raises(TypeError, match="positional"):
        flash_attention_varlen(q[0], k[0], v[0], cu, cu, 37, 37, True)


def test_flash_attention_takes_flash_attn_spellings():
    q, k, v = qkv(sq=29, sk=41)
    expected = R.flash_attention(q, k, v, window=(5, 3))
    assert_matches(flash_attention(q, k, v, window_size=(5, 3)), expected)
    assert_matches(flash_attention(q, k, v, window=(5, 3), window_size=(5, 3), dropout_p=0.0, softcap=0.0,
                                   alibi_slopes=None), expected)
    with pytest.raises(ValueError, match="disagree"):
        flash_attention(q, k, v, window=(5, 3), window_size=(4, 3))


@pytest.mark.parametrize("kw,name", [({"dropout_p": 0.1}, "dropout_p"), ({"softcap": 30.0}, "softcap")])
def test_unsupported_features_name_the_argument(kw, name):
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match=name):
        fa.flash_attn_func(q, k, v, **kw)
    with pytest.raises(NotImplementedError, match=name):
        flash_attention(q, k, v, **kw)
    cu = torch.tensor([0, 37], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=name):
        fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 37, 37, **kw)


def test_block_table_and_varlen_alibi_are_not_implemented():
    q, k, v = qkv()
    cu = torch.tensor([0, 37], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 37, 37, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 37, 37, alibi_slopes=torch.ones(4))


def test_softcap_off_values_are_accepted():
    q, k, v = qkv()
    # flash-attn: "softcap <= 0.0 means deactivate"
    assert_matches(fa.flash_attn_func(q, k, v, softcap=-1.0), R.flash_attention(q, k, v))


def alibi_reference(slopes, b, h, sq, sk, causal_form):
    """flash-attn's ALiBi in float64: its test's formula for the non-causal form, its kernel's
    (slope * j, a per-row constant away from the same softmax) for the causal one."""
    s = slopes.double().reshape(-1, h, 1, 1)
    i = torch.arange(sq, dtype=torch.float64)[:, None]
    j = torch.arange(sk, dtype=torch.float64)[None, :]
    return s * j if causal_form else -s * (i + sk - sq - j).abs()


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 2)), (True, (9, -1))])
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_slopes_match_flash_attn_formula(causal, window, per_batch):
    b, sq, sk, h = 2, 23, 31, 4
    q, k, v = qkv(b=b, sq=sq, sk=sk, hq=h, hk=2)
    slopes = (torch.rand(b, h) if per_batch else 2.0 ** -torch.arange(1, h + 1, dtype=torch.float32))
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, alibi_slopes=slopes,
                                           return_attn_probs=True)
    right = 0 if causal else window[1]
    bias = alibi_reference(slopes, b, h, sq, sk, causal_form=window[0] < 0 and right == 0)
    ref_out, ref_lse = R.flash_attention(q, k, v, causal=causal, window=window, attn_bias=bias, return_lse=True)
    assert_matches(out, ref_out)
    assert_matches(lse, ref_lse, 1e-5)
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype


def test_return_attn_probs_layout():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    assert s_dmask.shape == (0,) and s_dmask.dtype == torch.bfloat16
    _, ref_lse = R.flash_attention(q, k, v, return_lse=True)
    assert_matches(lse, ref_lse, 1e-5)


@pytest.mark.parametrize("d", [20, 4, 60])
def test_head_dim_not_a_multiple_of_8_is_padded(d):
    q, k, v = (t.requires_grad_() for t in qkv(d=d))
    out = fa.flash_attn_func(q, k, v, causal=True)
    assert out.shape == q.shape
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.flash_attention(rq, rk, rv, causal=True, softmax_scale=1 / math.sqrt(d))
    assert_matches(out, ref)
    grad = rnd(*out.shape, seed=9)
    out.backward(grad)
    ref.backward(grad.double())
    for a, r in ((q, rq), (k, rk), (v, rv)):
        assert_matches(a.grad, r.grad)


def test_packed_variants_equal_unpacked_with_gradients():
    q, k, v = qkv(hk=4)
    packed = torch.stack([q, k, v], dim=2).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(packed, causal=True)
    assert_matches(out, R.flash_attention(q, k, v, causal=True))
    out.sum().backward()
    assert packed.grad.shape == packed.shape
    q2, k2, v2 = qkv(hq=4, hk=2)
    assert_matches(fa.flash_attn_kvpacked_func(q2, torch.stack([k2, v2], dim=2), 0.0, None, True),
                   R.flash_attention(q2, k2, v2, causal=True))


def test_varlen_call_sites():
    lengths = [5, 0, 17, 9]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    total, hq, hk, d = int(cu[-1]), 4, 2, 24
    q, k, v = rnd(total, hq, d, seed=4), rnd(total, hk, d, seed=5), rnd(total, hk, d, seed=6)
    ref = R.flash_attention_varlen(q, k, v, cu, cu, causal=True)
    # the docstring's positional order: q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, ...
    assert_matches(fa.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, 0.0, None, True), ref)
    out, lse, s_dmask = fa.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen_q=17, max_seqlen_k=17, causal=True,
                                                  return_attn_probs=True)
    assert_matches(out, ref)
    assert lse.shape == (hq, total) and s_dmask.numel() == 0
    kv = torch.stack([k, v], dim=1)
    assert_matches(fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 17, 17, causal=True), ref)
    q4 = rnd(total, hk, d, seed=7)
    packed = torch.stack([q4, k, v], dim=1)
    assert_matches(fa.flash_attn_varlen_qkvpacked_func(packed, cu, 17, causal=True),
                   R.flash_attention_varlen(q4, k, v, cu, cu, causal=True))


def test_negative_window_sizes_mean_unbounded():
    q, k, v = qkv()
    assert_matches(fa.flash_attn_func(q, k, v, window_size=(-5, -2)), R.flash_attention(q, k, v))


def test_packed_shapes_are_checked():
    with pytest.raises(ValueError, match="batch, seqlen, 3"):
        fa.flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 2, 32))

