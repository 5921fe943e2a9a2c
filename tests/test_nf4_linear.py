"""llmkit.ops.nf4_linear: the fused NF4 matmul (forward and gradient to x)
against the float64 reference, every path (decode GEMV, small-M tiles,
large-M chunks, scalar), shapes whose rows straddle quantization blocks,
bitsandbytes' matmul_4bit, autograd, opcheck, torch.compile, bad input."""

import os
import subprocess
import sys

import pytest
import torch

import llmkit
from llmkit.ops import NF4State, reference
from llmkit.ops.quant import nf4_op_args
from peers import PeerCheck

# Relative to the largest reference magnitude: fp32 accumulation over K terms.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def make_weight(n, k, device, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return llmkit.ops.quantize_nf4(w.to(device), blocksize, double_quant)


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# M = 1..8: decode GEMV (4 rows a pass); 9..16: per-thread L2 tiles; > 16: chunked GEMM.
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 16, 17, 70])
@pytest.mark.parametrize("n,k", [(192, 256), (67, 130), (40, 96), (33, 64)])
def test_forward_matches_reference(device, rows, n, k):
    packed, state = make_weight(n, k, device, seed=n + k)
    x = torch.randn(rows, k, device=device)
    bias = torch.randn(n, device=device)
    ref = reference.nf4_linear(x, packed, state, bias)
    got = llmkit.ops.nf4_linear(x, packed, state, bias)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert rel_err(got, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("rows", [1, 4, 9, 33])
@pytest.mark.parametrize("n,k", [(128, 192), (67, 130)])
def test_grad_input_matches_reference(device, rows, n, k):
    packed, state = make_weight(n, k, device, double_quant=False, seed=rows)
    dy = torch.randn(rows, n, device=device)
    got = torch.ops.llmkit.nf4_linear_grad_input(dy, *nf4_op_args(packed, state))
    assert got.shape == (rows, k)
    assert rel_err(got, reference.nf4_linear_grad_input(dy, packed, state)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize,double_quant", [(32, False), (64, True), (128, True), (256, False)])
def test_dtypes_blocksizes_and_leading_dims(device, dtype, blocksize, double_quant):
    packed, state = make_weight(96, 256, device, blocksize, double_quant)
    for lead in [(1,), (2, 3), (2, 13)]:
        x = torch.randn(*lead, 256, device=device).to(dtype)
        bias = torch.randn(96, device=device).to(dtype)
        got = llmkit.ops.nf4_linear(x, packed, state, bias)
        assert got.shape == (*lead, 96) and got.dtype == dtype
        ref = reference.nf4_linear(x.reshape(-1, 256), packed, state, bias).reshape(*lead, 96)
        assert rel_err(got, ref) < TOLERANCE[dtype]


def test_empty_batch(device):
    packed, state = make_weight(32, 64, device)
    x = torch.randn(0, 64, device=device, requires_grad=True)
    y = llmkit.ops.nf4_linear(x, packed, state)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 64)


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_autograd_input_and_bias(device, rows):
    packed, state = make_weight(48, 160, device, seed=3)
    x = torch.randn(2, rows, 160, device=device, requires_grad=True)
    bias = torch.randn(48, device=device, requires_grad=True)
    dy = torch.randn(2, rows, 48, device=device)
    llmkit.ops.nf4_linear(x, packed, state, bias).backward(dy)
    w = reference.dequantize_nf4(packed, state, torch.float32).double()
    assert rel_err(x.grad, dy.double() @ w) < TOLERANCE[torch.float32]
    assert rel_err(bias.grad, dy.double().sum((0, 1))) < 1e-6
    assert packed.grad is None


def test_matches_bitsandbytes_matmul_4bit():
    """Ours against the float64 reference always; bitsandbytes' matmul_4bit against the same
    reference, compared with ours where it is right, reported (xfail) where it is not."""
    bnb = pytest.importorskip("bitsandbytes")
    packed, state = make_weight(128, 256, "cpu")
    peer = PeerCheck("bitsandbytes", bnb.__version__, "matmul_4bit of a (128, 256) NF4 weight, double quant")
    for rows in (1, 8, 33):
        x = torch.randn(rows, 256)
        ref = reference.nf4_linear(x, packed, state)
        ours = llmkit.ops.nf4_linear(x, packed, state)
        assert rel_err(ours, ref) < TOLERANCE[torch.float32]
        theirs = bnb.matmul_4bit(x, packed.t(), quant_state=state.to_bnb())
        if peer.close(f"{rows} rows", theirs, ref, TOLERANCE[torch.float32]):
            assert rel_err(ours, theirs.double()) < 1e-5
    peer.finish()


def test_accepts_a_bitsandbytes_quant_state():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(64, 128)
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(3, 128)
    ref = reference.nf4_linear(x, packed, NF4State.from_bnb(qs))
    assert rel_err(llmkit.ops.nf4_linear(x, packed, qs), ref) < 2e-5


def _run_isolated(code: str, **env) -> None:
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


_ALL_PATHS = """
import torch, llmkit
from llmkit.ops import reference
from llmkit.ops.quant import nf4_op_args
for n, k, bs in [(96, 256, 64), (67, 130, 32)]:
    w = torch.randn(n, k) * 0.1
    packed, state = llmkit.ops.quantize_nf4(w, bs, True)
    for rows in (1, 3, 7, 20):
        x, dy = torch.randn(rows, k), torch.randn(rows, n)
        ref = reference.nf4_linear(x, packed, state)
        got = llmkit.ops.nf4_linear(x, packed, state)
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < 2e-5, (n, k, rows)
        ref = reference.nf4_linear_grad_input(dy, packed, state)
        got = torch.ops.llmkit.nf4_linear_grad_input(dy, *nf4_op_args(packed, state))
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < 2e-5, (n, k, rows)
"""


def test_portable_scalar_path():
    """LLMKIT_FORCE_SCALAR=1: the non-AVX2 code (tiles, no decode GEMV)."""
    _run_isolated(_ALL_PATHS, LLMKIT_FORCE_SCALAR="1")


def test_large_m_path_with_many_chunks():
    """Every row count through the chunked path, 4 KiB chunks (many chunks, partial last)."""
    _run_isolated(_ALL_PATHS, LLMKIT_NF4_LINEAR="0,0,4")


def test_small_m_tiles_for_every_row_count():
    _run_isolated(_ALL_PATHS, LLMKIT_NF4_LINEAR="0,64,4096")


def test_opcheck(device):
    packed, state = make_weight(40, 96, device)
    args = nf4_op_args(packed, state)
    x = torch.randn(3, 96, device=device, requires_grad=True)
    bias = torch.randn(40, device=device)
    torch.library.opcheck(torch.ops.llmkit.nf4_linear.default, (x, *args, bias))
    torch.library.opcheck(torch.ops.llmkit.nf4_linear_grad_input.default, (torch.randn(3, 40, device=device), *args))


def test_torch_compile_fullgraph(device):
    packed, state = make_weight(40, 96, device)

    def layer(x):
        return llmkit.ops.nf4_linear(x, packed, state).relu().sum()

    x = torch.randn(5, 96, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    layer(x2).backward()
    torch.testing.assert_close(out, layer(x2.detach()))
    torch.testing.assert_close(x.grad, x2.grad)


def test_bad_input():
    packed, state = make_weight(40, 96, "cpu")
    x = torch.randn(3, 96)
    with pytest.raises(ValueError, match="features"):
        llmkit.ops.nf4_linear(torch.randn(3, 95), packed, state)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        llmkit.ops.nf4_linear(x.double(), packed, state)
    with pytest.raises(ValueError, match="bias must have shape"):
        llmkit.ops.nf4_linear(x, packed, state, torch.randn(41))
    with pytest.raises(TypeError, match="bias has dtype"):
        llmkit.ops.nf4_linear(x, packed, state, torch.randn(40).half())
    with pytest.raises(ValueError, match="packed holds"):
        llmkit.ops.nf4_linear(x, packed[:-1], state)
    flat_packed, flat_state = llmkit.ops.quantize_nf4(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D"):
        llmkit.ops.nf4_linear(torch.randn(3, 64), flat_packed, flat_state)
    with pytest.raises(TypeError, match="NF4State"):
        llmkit.ops.nf4_linear(x, packed, {"absmax": 1})
    with pytest.raises(ValueError, match="at least one dimension"):
        torch.ops.llmkit.nf4_linear(torch.tensor(1.0), *nf4_op_args(packed, state), None)


# bitsandbytes 0.50's bnb.nn.Linear4bit.__init__ parameters, in order.
BNB_LINEAR4BIT_PARAMS = ["input_features", "output_features", "bias", "compute_dtype", "compress_statistics",
                         "quant_type", "quant_storage", "device"]


def test_linear4bit_has_bitsandbytes_signature():
    import inspect

    from llmkit.nn.linear4bit import Linear4bit, LinearNF4

    params = inspect.signature(Linear4bit.__init__).parameters
    positional = [n for n, p in params.items() if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == BNB_LINEAR4BIT_PARAMS
    assert params["quant_type"].default == "nf4"  # bitsandbytes' "fp4" is not implemented (docstring says why)
    assert params["compress_statistics"].default is True and params["quant_storage"].default is torch.uint8
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    theirs = inspect.signature(bnb.nn.Linear4bit.__init__).parameters
    assert [n for n in theirs if n != "self"] == BNB_LINEAR4BIT_PARAMS
    theirs_nf4 = [n for n in inspect.signature(bnb.nn.LinearNF4.__init__).parameters if n != "self"]
    ours_nf4 = [n for n, p in inspect.signature(LinearNF4.__init__).parameters.items()
                if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    assert ours_nf4 == theirs_nf4


def test_linear4bit_bitsandbytes_call_sites():
    """bitsandbytes-style constructions (positional and keyword) build the layer they describe."""
    from llmkit.nn.linear4bit import Linear4bit, LinearNF4

    torch.manual_seed(0)
    layer = Linear4bit(64, 32, True, torch.float32, False, "nf4", torch.uint8, "cpu")
    assert layer.in_features == 64 and layer.out_features == 32 and layer.bias is not None
    assert layer.quant_state.state2 is None and layer.compute_dtype == torch.float32
    layer = Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    assert layer.bias is None and layer.quant_state.state2 is not None and layer.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    ref = x.double() @ reference.dequantize_nf4(layer.weight, layer.quant_state, torch.float32).double().T
    assert rel_err(layer(x.bfloat16()).float(), ref) < TOLERANCE[torch.bfloat16]
    assert Linear4bit(64, 32, double_quant=False).quant_state.state2 is None  # llmkit's older keyword
    assert LinearNF4(64, 32, compress_statistics=False).quant_state.state2 is None
    with pytest.raises(NotImplementedError, match="fp4"):
        Linear4bit(64, 32, quant_type="fp4")
    with pytest.raises(NotImplementedError, match="quant_storage"):
        Linear4bit(64, 32, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="disagree"):
        Linear4bit(64, 32, compress_statistics=False, double_quant=True)
