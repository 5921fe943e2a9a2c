"""gelu_tanh (GPT-2's gelu_new) against the float64 reference and ATen."""

import pytest
import torch
import torch.nn.functional as F

import llmkit  # noqa: F401
from llmkit.ops import gelu_tanh, reference
from portable import run_portable  # tests/portable.py


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1003, 100_003])
def test_forward_and_backward_match_float64(n):
    torch.manual_seed(n)
    x = torch.randn(n) * 5
    if n > 6:
        x[:6] = torch.tensor([0.0, 1e-8, -1e-8, 30.0, -30.0, -4.0])
    x.requires_grad_()
    y = gelu_tanh(x)
    x64 = x.detach().double().requires_grad_()
    ref = reference.gelu_tanh(x64)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(n)
    y.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_shapes_strides_and_other_dtypes():
    x = torch.randn(6, 40)[:, ::2]  # non-contiguous
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    assert gelu_tanh(x).shape == (6, 20)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # ATen's kernels
        xd = torch.randn(33, dtype=dtype)
        torch.testing.assert_close(gelu_tanh(xd), F.gelu(xd, approximate="tanh"))


def test_portable_build_matches_too():
    code = ("import torch, llmkit; from llmkit.ops import gelu_tanh, reference\n"
            "torch.manual_seed(0); x = torch.randn(1001) * 4\n"
            "torch.testing.assert_close(gelu_tanh(x).double(), reference.gelu_tanh(x), rtol=1e-5, atol=1e-6)\n"
            "g = torch.randn(1001); d = torch.ops.llmkit.gelu_tanh_backward(g, x)\n"
            "torch.testing.assert_close(d, torch.ops.aten.gelu_backward(g, x, approximate='tanh'), rtol=1e-5,"
            " atol=1e-5); print('ok')\n")
    run_portable(code)


def test_opcheck_and_errors():
    torch.library.opcheck(torch.ops.llmkit.gelu_tanh.default, (torch.randn(3, 17, requires_grad=True),))
    torch.library.opcheck(torch.ops.llmkit.gelu_tanh_backward.default, (torch.randn(5), torch.randn(5)))
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.llmkit.gelu_tanh_backward(torch.randn(4), torch.randn(5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        gelu_tanh([1.0])
