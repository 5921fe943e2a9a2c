"""The fused softmax cross-entropy op and the LM-head loss built on it."""

import pytest
import torch
import torch.nn.functional as F

import llmkit  # noqa: F401
from llmkit.models import GPT
from llmkit.nn.loss import linear_cross_entropy
from llmkit.ops import cross_entropy_fused_, reference
from portable import run_portable  # tests/portable.py


@pytest.mark.parametrize("rows,vocab", [(1, 1), (7, 13), (33, 517), (129, 8200)])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_op_matches_float64_reference(rows, vocab, compute_grad):
    torch.manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab) * 4
    targets = torch.randint(0, vocab, (rows,))
    targets[::3] = -100
    ref_losses, ref_grad = reference.cross_entropy_fused_(logits, targets, -100, 0.37, compute_grad)
    work = logits.clone()
    losses = cross_entropy_fused_(work, targets, -100, 0.37, compute_grad)
    assert losses.dtype == torch.float32 and losses.shape == (rows,)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=2e-6, atol=2e-5)
    if compute_grad:
        torch.testing.assert_close(work.double(), ref_grad, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(work, logits)  # untouched without a gradient


def test_portable_build_matches_too():
    code = ("import torch, llmkit; from llmkit.ops import cross_entropy_fused_, reference\n"
            "torch.manual_seed(0); x = torch.randn(17, 1001) * 3; t = torch.randint(0, 1001, (17,))\n"
            "l, g = reference.cross_entropy_fused_(x, t, -100, 1.0, True); w = x.clone()\n"
            "torch.testing.assert_close(cross_entropy_fused_(w, t).double(), l, rtol=2e-6, atol=2e-5)\n"
            "torch.testing.assert_close(w.double(), g, rtol=1e-5, atol=1e-7); print('ok')\n")
    run_portable(code)


def test_op_bad_input():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        cross_entropy_fused_(logits.clone(), torch.tensor([1, 2, 10, 3]))
    with pytest.raises(ValueError, match="outside"):
        cross_entropy_fused_(logits.clone(), torch.tensor([1, -5, 2, 3]))
    untouched = logits.clone()
    with pytest.raises(ValueError):
        cross_entropy_fused_(untouched, torch.tensor([1, 2, 10, 3]))
    assert torch.equal(untouched, logits)  # checked before anything is written
    with pytest.raises(TypeError, match="float32"):
        cross_entropy_fused_(logits.double(), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(TypeError, match="int64"):
        cross_entropy_fused_(logits.clone(), torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy_fused_(torch.randn(10, 4).t(), torch.tensor([1, 2, 3, 0]))
    with pytest.raises(ValueError, match="targets must be"):
        cross_entropy_fused_(logits.clone(), torch.tensor([1, 2]))


def test_opcheck():
    logits = torch.randn(5, 11)
    targets = torch.tensor([0, 3, -100, 10, 2])
    torch.library.opcheck(torch.ops.llmkit.cross_entropy_fused_.default, (logits, targets, -100, 0.5, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_matches_torch(dtype):
    torch.manual_seed(1)
    x = torch.randn(41, 24, dtype=dtype, requires_grad=True)
    w = torch.randn(301, 24, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 301, (41,))
    t[5:9] = -100
    ref = F.cross_entropy(x @ w.t(), t)
    ref_grads = torch.autograd.grad(ref * 1.7, (x, w))
    loss = linear_cross_entropy(x, w, t)
    grads = torch.autograd.grad(loss * 1.7, (x, w))
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # the softmax runs in float32
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(linear_cross_entropy(x, w, torch.full((41,), -100)))


def test_gpt_training_path_equals_full_logits():
    torch.manual_seed(0)
    model = GPT.from_preset("gpt-tiny")
    ids = torch.randint(0, 512, (3, 40))
    full = model(ids, labels=ids)
    full.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(ids, labels=ids, logits_to_keep="none")
    assert fused.logits is None
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-7, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, float32 softmax
        bf16 = model(ids, labels=ids, logits_to_keep="none").loss
    assert abs(bf16.item() - full.loss.item()) < 0.05
    with pytest.raises(ValueError, match="pass labels"):
        model(ids, logits_to_keep="none")
