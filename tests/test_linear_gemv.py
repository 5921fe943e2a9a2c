"""The decode-time GEMV op (CPU) against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import llmkit  # noqa: F401
from llmkit.ops import decode_linear, linear_gemv, reference
from portable import run_portable  # tests/portable.py


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (3, 7), (37, 129), (1153, 384), (5003, 61)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference(rows, out_features, in_features, with_bias):
    torch.manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features)
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if with_bias else None
    y = linear_gemv(x, w, b)
    ref = reference.linear_gemv(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # fp32 sums of in_features products: error grows like sqrt(in) * |w||x| * eps.
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * in_features ** 0.5)


def test_leading_dims_and_strided_x():
    w = torch.randn(33, 20)
    x = torch.randn(2, 1, 40)[..., ::2]  # non-contiguous x is fine
    torch.testing.assert_close(linear_gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert linear_gemv(x, w).shape == (2, 1, 33)


def test_portable_build_matches_too():
    code = ("import torch, llmkit; from llmkit.ops import linear_gemv, reference\n"
            "torch.manual_seed(0); x = torch.randn(3, 131); w = torch.randn(77, 131); b = torch.randn(77)\n"
            "torch.testing.assert_close(linear_gemv(x, w, b).double(), reference.linear_gemv(x, w, b),"
            " rtol=1e-5, atol=1e-4); print('ok')\n")
    run_portable(code)


def test_bad_input_and_fallback():
    w = torch.randn(10, 6)
    with pytest.raises(ValueError, match="at most 8 rows"):
        linear_gemv(torch.randn(9, 6), w)
    with pytest.raises(TypeError, match="float32"):
        linear_gemv(torch.randn(1, 6).double(), w.double())
    with pytest.raises(ValueError, match="contiguous"):
        linear_gemv(torch.randn(1, 10), w.t())
    with pytest.raises(ValueError, match="in_features = 6"):
        linear_gemv(torch.randn(1, 5), w)
    with pytest.raises(ValueError, match="bias"):
        linear_gemv(torch.randn(1, 6), w, torch.randn(9))
    # decode_linear falls back to F.linear where the kernel does not apply.
    for x, weight in ((torch.randn(9, 6), w), (torch.randn(2, 6).double(), w.double()), (torch.randn(1, 10), w.t())):
        torch.testing.assert_close(decode_linear(x, weight), F.linear(x, weight))


def test_opcheck():
    torch.library.opcheck(torch.ops.llmkit.linear_gemv.default, (torch.randn(2, 9), torch.randn(5, 9), torch.randn(5)))
    torch.library.opcheck(torch.ops.llmkit.linear_gemv.default, (torch.randn(1, 9), torch.randn(5, 9), None))
