"""llmkit.ops.lora_linear (fused LoRA) and lora_dropout: forward and the
hand-derived backward against the float64 reference (dense and NF4 bases,
with and without dropout), what the backward keeps, the dropout mask's
statistics, opcheck, torch.compile and bad input."""

import math

import pytest
import torch

import llmkit
from llmkit.ops import reference

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def make_layer(n, k, r, device, nf4: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(device)
    base = llmkit.ops.quantize_nf4(w, 64, True) if nf4 else w.to(dtype)
    A = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(device, dtype).requires_grad_()
    B = (torch.randn(n, r, generator=g) * 0.1).to(device, dtype).requires_grad_()  # nonzero: the LoRA path matters
    bias = (torch.randn(n, generator=g) * 0.1).to(device, dtype).requires_grad_()
    return base, bias, A, B


def reference_grads(x, base, bias, A, B, scaling, p, seed, dy):
    """Gradients of the float64 reference by autograd."""
    xr = x.detach().double().requires_grad_()
    Ar, Br, br = (t.detach().double().requires_grad_() for t in (A, B, bias))
    if isinstance(base, torch.Tensor):
        y = xr @ base.double().T + br
    else:
        y = xr @ reference.dequantize_nf4(*base, torch.float32).double().T + br
    xd = xr * reference.lora_dropout_keep(x.shape, p, seed, x.device) / (1 - p) if p > 0 else xr
    y = y + scaling * (xd @ Ar.T) @ Br.T
    y.backward(dy.double())
    return y.detach(), xr.grad, Ar.grad, Br.grad, br.grad


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_forward_and_backward_match_reference(device, nf4, p, rows):
    base, bias, A, B = make_layer(72, 128, 8, device, nf4, seed=rows)
    x = torch.randn(2, rows, 128, device=device, requires_grad=True)
    dy = torch.randn(2, rows, 72, device=device)
    y = llmkit.ops.lora_linear(x, base, bias, A, B, scaling=2.0, dropout_p=p, seed=1234)
    y.backward(dy)
    ry, rdx, rdA, rdB, rdb = reference_grads(x, base, bias, A, B, 2.0, p, 1234, dy)
    assert rel_err(y, ry) < TOLERANCE[torch.float32]
    for got, ref in ((x.grad, rdx), (A.grad, rdA), (B.grad, rdB), (bias.grad, rdb)):
        assert rel_err(got, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_half_precision(device, dtype, nf4):
    base, bias, A, B = make_layer(64, 96, 4, device, nf4, dtype)
    x = torch.randn(9, 96, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(9, 64, device=device, dtype=dtype)
    y = llmkit.ops.lora_linear(x, base, bias, A, B, 0.5)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    ry, rdx, rdA, rdB, _ = reference_grads(x, base, bias, A, B, 0.5, 0.0, 0, dy)
    for got, ref in ((y, ry), (x.grad, rdx), (A.grad, rdA), (B.grad, rdB)):
        assert rel_err(got, ref) < TOLERANCE[dtype]


def test_fp32_adapters_over_a_bf16_base():
    """PEFT keeps adapters in fp32 over a bf16 base: they are cast to x's dtype inside, grads stay fp32."""
    base, bias, A, B = make_layer(32, 64, 4, "cpu", False, torch.bfloat16)
    A32, B32 = (t.detach().float().requires_grad_() for t in (A, B))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    llmkit.ops.lora_linear(x, base, None, A32, B32, 1.0).sum().backward()
    assert A32.grad.dtype == torch.float32 and B32.grad.abs().sum() > 0


def test_eval_mode_disables_dropout():
    base, bias, A, B = make_layer(32, 64, 4, "cpu", False)
    x = torch.randn(5, 64)
    plain = llmkit.ops.lora_linear(x, base, bias, A, B, 1.0)
    evaluated = llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.5, training=False)
    trained = llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.5, seed=7)
    torch.testing.assert_close(evaluated, plain)
    assert not torch.allclose(trained, plain)


def test_dropout_seed_from_the_default_generator():
    base, bias, A, B = make_layer(32, 64, 4, "cpu", False)
    x = torch.randn(5, 64)
    torch.manual_seed(3)
    first = llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.5)
    second = llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(3)
    again = llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.5)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_backward_keeps_only_x_and_the_weights():
    """No (rows x r), (rows x out) activation or mask is saved: only x, the
    adapters and the frozen weight (by reference) — PEFT's autograd keeps the
    dropped input, x A^T and the mask besides."""
    base, bias, A, B = make_layer(48, 80, 8, "cpu", False)
    x = torch.randn(30, 80, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.1, seed=5)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(30, 80), (48, 80), (8, 80), (48, 8), ()])  # () is the dropout seed
    assert any(t is x for t in saved)


def test_no_grad_for_x_when_not_needed():
    base, bias, A, B = make_layer(32, 64, 4, "cpu", True)
    x = torch.randn(5, 64)
    llmkit.ops.lora_linear(x, base, None, A, B, 1.0).sum().backward()
    assert A.grad is not None and B.grad is not None and x.grad is None


# ------------------------------------------------------------- dropout --


def test_dropout_mask_matches_reference_and_scale(device):
    x = torch.randn(37, 129, device=device)
    p = 0.3
    got = llmkit.ops.lora_dropout(x, p, 99)
    keep = reference.lora_dropout_keep(x.shape, p, 99, device)
    torch.testing.assert_close(got, torch.where(keep, x * (1 / (1 - p)), torch.zeros_like(x)))
    assert torch.equal(llmkit.ops.lora_dropout(x, 0.0, 99), x)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_rate_statistics(p):
    n = 400_000
    kept = float((llmkit.ops.lora_dropout(torch.ones(n), p, 2024) != 0).double().mean())
    se = math.sqrt(p * (1 - p) / n)
    assert abs((1 - kept) - p) < 4 * se
    # different seeds give (nearly) independent masks
    a = llmkit.ops.lora_dropout(torch.ones(n), p, 1) != 0
    b = llmkit.ops.lora_dropout(torch.ones(n), p, 2) != 0
    both = float((a & b).double().mean())
    assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)


def test_dropout_non_contiguous_input_uses_row_major_indices():
    x = torch.randn(20, 30).t()
    got = llmkit.ops.lora_dropout(x, 0.5, 11)
    keep = reference.lora_dropout_keep((30, 20), 0.5, 11)
    torch.testing.assert_close(got, torch.where(keep, x * 2, torch.zeros_like(x)))


# --------------------------------------------------- compile / opcheck --


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_opcheck(device, nf4):
    base, bias, A, B = make_layer(24, 64, 4, device, nf4)
    from llmkit.ops.lora import _base_args

    x = torch.randn(3, 64, device=device, requires_grad=True)
    seed = torch.tensor(17)
    args = (x, *_base_args(base), bias, A, B, 0.5, 0.2, seed)
    torch.library.opcheck(torch.ops.llmkit.lora_linear.default, args)
    dy = torch.randn(3, 24, device=device)
    torch.library.opcheck(torch.ops.llmkit.lora_linear_backward.default,
                          (dy, x.detach(), *_base_args(base), A.detach(), B.detach(), 0.5, 0.2, seed, True))
    torch.library.opcheck(torch.ops.llmkit.lora_dropout.default, (torch.randn(5, 7, device=device), 0.4, 3))


def test_torch_compile_fullgraph_draws_a_fresh_dropout_seed_per_call(device):
    base, bias, A, B = make_layer(24, 64, 4, device, False)
    compiled = torch.compile(lambda x: llmkit.ops.lora_linear(x, base, bias, A, B, 0.5, dropout_p=0.5),
                             fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 64, device=device)
    assert not torch.equal(compiled(x), compiled(x))


def test_seeds_are_taken_modulo_2_64():
    x = torch.randn(7, 9)
    torch.testing.assert_close(llmkit.ops.lora_dropout(x, 0.5, 2**64 + 5), llmkit.ops.lora_dropout(x, 0.5, 5))
    keep = reference.lora_dropout_keep(x.shape, 0.5, 2**63 + 1)
    torch.testing.assert_close(llmkit.ops.lora_dropout(x, 0.5, 2**63 + 1), torch.where(keep, 2 * x, 0 * x))
    base, bias, A, B = make_layer(24, 9, 4, "cpu", False)
    llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.3, seed=2**63 + 7)
    with pytest.raises(TypeError, match="seed must be an int"):
        llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=0.3, seed=1.5)


def test_torch_compile_fullgraph(device):
    base, bias, A, B = make_layer(24, 64, 4, device, True)

    def step(x):
        return llmkit.ops.lora_linear(x, base, bias, A, B, 0.5, dropout_p=0.1, seed=3).square().sum()

    x = torch.randn(6, 64, device=device)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    got = A.grad.clone()
    A.grad = None
    step(x).backward()
    torch.testing.assert_close(got, A.grad)


# ------------------------------------------------------------ bad input --


def test_bad_input():
    base, bias, A, B = make_layer(24, 64, 4, "cpu", False)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="lora_A must be"):
        llmkit.ops.lora_linear(x, base, bias, A[:, :10], B, 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        llmkit.ops.lora_linear(x, base, bias, A, B[:, :3], 1.0)
    with pytest.raises(ValueError, match="features"):
        llmkit.ops.lora_linear(torch.randn(3, 65), base, bias, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        llmkit.ops.lora_linear(x, base, bias, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="finite"):
        llmkit.ops.lora_linear(x, base, bias, A, B, float("nan"))
    with pytest.raises(ValueError, match="frozen"):
        llmkit.ops.lora_linear(x, base.clone().requires_grad_(), bias, A, B, 1.0)
    with pytest.raises(TypeError, match="weight has dtype"):
        llmkit.ops.lora_linear(x, base.double(), bias, A, B, 1.0)
    with pytest.raises(TypeError, match="base must be"):
        llmkit.ops.lora_linear(x, "weights", bias, A, B, 1.0)
    with pytest.raises(ValueError, match="p must be in"):
        llmkit.ops.lora_dropout(x, -0.1, 0)
    with pytest.raises(TypeError, match="float32"):
        llmkit.ops.lora_dropout(x.long(), 0.1, 0)


def test_dropout_portable_path_matches_reference():
    """LLMKIT_FORCE_SCALAR=1 takes the portable loop instead of the AVX2 one: same mask, bit for bit."""
    import os
    import subprocess
    import sys

    code = """
import torch, llmkit
from llmkit.ops import reference
for n, p, seed in [(1001, 0.3, 2**40 + 5), (4096, 0.05, 7), (9, 0.9, 2**63 + 3)]:
    x = torch.randn(n)
    keep = reference.lora_dropout_keep((n,), p, seed)
    assert torch.equal(llmkit.ops.lora_dropout(x, p, seed), torch.where(keep, x * (1 / (1 - p)), 0 * x)), (n, p)
"""
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LLMKIT_FORCE_SCALAR="1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
