"""NF4 quantize / dequantize: kernels vs the reference, vs bitsandbytes, vs
committed golden vectors, float64 error bounds, state interop, op pattern
(opcheck, torch.compile) and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.ops import NF4State, dequantize_nf4, dynamic_map, quantize_nf4
from llmkit.ops import reference as ref
from llmkit.ops.quant_state import NF4_CODES

from conftest import DEVICES
from peers import PeerCheck

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbF
except Exception:  # bitsandbytes is a test reference, optional here
    bnbF = None

needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes not installed")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes: partial last blocks, odd element counts, fewer elements than one block.
SHAPES = [(1,), (7, 5, 3), (333, 17), (1000, 1001), (64,), (3, 4096)]
GOLDEN = Path(__file__).parent / "data" / "nf4_golden.safetensors"


def random_weights(shape, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def assert_same_state(a: NF4State, b: NF4State):
    assert torch.equal(a.absmax, b.absmax)
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    assert (a.state2 is None) == (b.state2 is None)
    if a.state2 is not None:
        assert torch.equal(a.offset, b.offset)
        assert torch.equal(a.state2.absmax, b.state2.absmax)
        assert torch.equal(a.state2.code, b.state2.code)


# ----------------------------------------------------------- correctness --


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_kernel_matches_reference(device, dtype, shape, blocksize, double_quant):
    w = random_weights(shape, dtype, device, seed=hash((shape, blocksize)) % 1000)
    packed, state = quantize_nf4(w, blocksize, double_quant)
    packed_ref, state_ref = ref.quantize_nf4(w, blocksize, double_quant)
    n = w.numel()
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed, packed_ref)
    assert_same_state(state, state_ref)
    for out_dtype in [None, *DTYPES]:
        out = dequantize_nf4(packed, state, out_dtype)
        assert out.shape == w.shape and out.dtype == (out_dtype or dtype)
        assert torch.equal(out, ref.dequantize_nf4(packed, state, out_dtype))


@pytest.mark.parametrize("double_quant", [False, True])
def test_codes_are_nearest_in_float64(device, double_quant):
    """Every element holds the NF4 code nearest to x / absmax (float64), up to
    float32 rounding at the midpoints; the error is at most half a code gap."""
    w = random_weights((517, 33), torch.float32, device, seed=3)
    packed, state = quantize_nf4(w, 64, double_quant)
    n = w.numel()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n].long().cpu()
    absmax_exact = ref.quantize_nf4(w, 64)[1].absmax.double().cpu()  # before double quant
    scale = absmax_exact.repeat_interleave(64)[:n]
    x = w.reshape(-1).double().cpu() / scale
    table = torch.tensor(NF4_CODES, dtype=torch.float64)
    dist = (x[:, None] - table[None, :]).abs()
    chosen = dist.gather(1, codes[:, None]).squeeze(1)
    assert (chosen - dist.min(1).values).max().item() < 1e-6
    # Reconstruction error bound in float64, with the (double-quantized) absmax the state holds.
    out = dequantize_nf4(packed, state, torch.float32).double().cpu().reshape(-1)
    max_half_gap = (table[1:] - table[:-1]).max().item() / 2
    used_scale = ref.block_absmax(state).double().cpu().repeat_interleave(64)[:n]
    bound = used_scale * max_half_gap + (used_scale - scale).abs() + 1e-6
    assert torch.all((out - w.reshape(-1).double().cpu()).abs() <= bound)


def test_zero_and_constant_blocks(device):
    w = torch.zeros(3, 64, device=device)
    w[1] = 2.5
    w[2, :10] = -1.0
    for dq in (False, True):
        packed, state = quantize_nf4(w, 64, dq)
        assert torch.equal(packed, ref.quantize_nf4(w, 64, dq)[0])
        assert torch.equal(dequantize_nf4(packed, state), ref.dequantize_nf4(packed, state))
    packed, state = quantize_nf4(w, 64)
    assert torch.equal(dequantize_nf4(packed, state), w)  # 0, +-1 * absmax are exact codes


def test_noncontiguous_input(device):
    w = random_weights((96, 130), torch.float32, device).t()
    assert not w.is_contiguous()
    packed, state = quantize_nf4(w, 64)
    assert torch.equal(packed, quantize_nf4(w.contiguous(), 64)[0])
    assert torch.equal(dequantize_nf4(packed, state), ref.dequantize_nf4(packed, state))


def test_dynamic_map_is_sorted_256():
    m = dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] > m[:-1]) and m[-1] == 1.0 and (m == 0).sum() == 1


@pytest.mark.parametrize("blocksize", [64, 256])
def test_blockwise_8bit_matches_reference(device, blocksize):
    x = random_weights((10_000 + 7,), torch.float32, device, seed=5)
    x[:blocksize] = 0  # an all-zero block
    code = dynamic_map().to(device)
    q, absmax = torch.ops.llmkit.quantize_blockwise_8bit(x, code, blocksize)
    q_ref, absmax_ref = ref.quantize_blockwise_8bit(x, code, blocksize)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)


def test_scalar_path_matches(tmp_path):
    """LLMKIT_FORCE_SCALAR=1 runs the portable (non-AVX2) CPU path: same bytes."""
    script = (
        "import torch, llmkit\n"
        "from llmkit.ops import quantize_nf4, dequantize_nf4, reference as ref\n"
        "g = torch.Generator().manual_seed(1)\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    for shape in [(333, 17), (4097,)]:\n"
        "        w = (torch.randn(shape, generator=g) * 2).to(dt)\n"
        "        p, s = quantize_nf4(w, 64, True)\n"
        "        pr, sr = ref.quantize_nf4(w, 64, True)\n"
        "        assert torch.equal(p, pr) and torch.equal(s.absmax, sr.absmax)\n"
        "        for od in (torch.float32, torch.float16, torch.bfloat16):\n"
        "            assert torch.equal(dequantize_nf4(p, s, od), ref.dequantize_nf4(p, s, od))\n"
        "print('scalar ok')\n"
    )
    env = dict(os.environ, LLMKIT_FORCE_SCALAR="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "scalar ok" in result.stdout


# ------------------------------------------------------------ bitsandbytes --


def bnb_check(case: str) -> PeerCheck:
    return PeerCheck("bitsandbytes", bitsandbytes.__version__, case)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5, 3), (333, 17), (1000, 1001), (4096, 512)])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_equal_bitsandbytes(dtype, shape, blocksize, double_quant):
    """llmkit equals the reference always; bitsandbytes is compared with llmkit
    where it equals the reference too, and reported (xfail) where it does not:
    bitsandbytes 0.50.2's CPU dequantize_4bit, for one, is wrong with AVX-512
    for blocksize 1024 on (4096, 512) from element 1024 on."""
    w = random_weights(shape, dtype, "cpu", seed=blocksize)
    packed, state = quantize_nf4(w, blocksize, double_quant)
    packed_ref, state_ref = ref.quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(packed, packed_ref)
    assert_same_state(state, state_ref)
    expected = ref.dequantize_nf4(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), expected)

    peer = bnb_check(f"quantize_4bit / dequantize_4bit of a {dtype} {shape} tensor, blocksize {blocksize}, "
                     f"compress_statistics={double_quant}")
    packed_b, state_b = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    if peer.agrees("quantize_4bit packed bytes", packed_b, packed_ref) and \
            peer.agrees("quantize_4bit absmax", state_b.absmax, state_ref.absmax):
        assert torch.equal(packed, packed_b)
        assert_same_state(state, NF4State.from_bnb(state_b))
        assert torch.equal(state.code, state_b.code)
        # their state through our kernel equals ours
        assert torch.equal(dequantize_nf4(packed_b, state_b), expected)
    if peer.agrees("dequantize_4bit", bnbF.dequantize_4bit(packed_b, state_b), ref.dequantize_nf4(
            packed_b, NF4State.from_bnb(state_b))):
        assert torch.equal(dequantize_nf4(packed, state), bnbF.dequantize_4bit(packed_b, state_b))
    # ours through theirs: their kernel on our bytes, against the reference
    peer.agrees("dequantize_4bit of llmkit's bytes", bnbF.dequantize_4bit(packed, state.to_bnb()), expected)
    peer.finish()


@needs_bnb
def test_blockwise_8bit_equals_bitsandbytes():
    x = random_weights((100_003,), torch.float32, "cpu", seed=9)
    q, absmax = torch.ops.llmkit.quantize_blockwise_8bit(x, dynamic_map(), 256)
    q_ref, absmax_ref = ref.quantize_blockwise_8bit(x, dynamic_map(), 256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())
    peer = bnb_check("quantize_blockwise of 100003 float32 values, blocksize 256")
    q_b, state_b = bnbF.quantize_blockwise(x, blocksize=256)
    if peer.agrees("codes", q_b, q_ref) and peer.agrees("absmax", state_b.absmax, absmax_ref):
        assert torch.equal(q, q_b) and torch.equal(absmax, state_b.absmax)
    peer.finish()


@needs_bnb
def test_state_dict_interop_with_bitsandbytes(tmp_path):
    """A Linear4bit-style state_dict (packed quant_state, safetensors) written by
    bitsandbytes loads here, and ours loads in bitsandbytes."""
    from safetensors.torch import load_file, save_file

    w = random_weights((300, 70), torch.bfloat16, "cpu", seed=11)
    packed_b, state_b = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {"weight": packed_b, **{f"weight.{k}": v for k, v in state_b.as_dict(packed=True).items()}}
    save_file(theirs, tmp_path / "theirs.safetensors")
    loaded = load_file(tmp_path / "theirs.safetensors")
    state = NF4State.from_dict({k: v for k, v in loaded.items() if k != "weight"})
    theirs_expected = ref.dequantize_nf4(packed_b, NF4State.from_bnb(state_b))
    assert torch.equal(dequantize_nf4(loaded["weight"], state), theirs_expected)

    packed, ours_state = quantize_nf4(w, 64, double_quant=True)
    ours = {"weight": packed, **{f"weight.{k}": v for k, v in ours_state.as_dict(packed=True).items()}}
    assert set(ours) == set(theirs)
    save_file(ours, tmp_path / "ours.safetensors")
    loaded = load_file(tmp_path / "ours.safetensors")
    qs = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in loaded.items() if k != "weight"}, device="cpu")
    peer = bnb_check("dequantize_4bit of a bfloat16 (300, 70) state_dict, blocksize 64, double quant")
    peer.agrees("dequantize_4bit of their own state", bnbF.dequantize_4bit(packed_b, state_b), theirs_expected)
    if peer.agrees("dequantize_4bit of llmkit's state_dict", bnbF.dequantize_4bit(loaded["weight"], qs),
                   ref.dequantize_nf4(packed, ours_state)):
        assert torch.equal(bnbF.dequantize_4bit(loaded["weight"], qs), dequantize_nf4(packed, ours_state))
    peer.finish()


# --------------------------------------------------------------- golden --


def test_golden_vectors():
    """bitsandbytes 0.50.2 outputs, committed (tests/data/make_golden.py), so the
    byte-compatibility check holds without bitsandbytes installed."""
    from safetensors.torch import load_file

    golden = load_file(GOLDEN)
    cases = sorted({k.split("/")[0] for k in golden if k.split("/")[1] == "packed"})
    assert len(cases) >= 12
    for case in cases:
        w = golden[f"{case}/input"]
        blocksize = int(golden[f"{case}/blocksize"].item())
        double_quant = f"{case}/offset" in golden
        packed, state = quantize_nf4(w, blocksize, double_quant)
        assert torch.equal(packed, golden[f"{case}/packed"]), case
        assert torch.equal(state.absmax, golden[f"{case}/absmax"]), case
        if double_quant:
            assert torch.equal(state.offset, golden[f"{case}/offset"]), case
            assert torch.equal(state.state2.absmax, golden[f"{case}/nested_absmax"]), case
        assert torch.equal(dequantize_nf4(packed, state), golden[f"{case}/dequantized"]), case


# ------------------------------------------------------------ op pattern --


def test_opcheck(device):
    w = random_weights((37, 29), torch.float32, device)
    code = dynamic_map().to(device)
    torch.library.opcheck(torch.ops.llmkit.quantize_nf4.default, (w, 64))
    torch.library.opcheck(torch.ops.llmkit.quantize_nf4.default, (w.to(torch.bfloat16), 32))
    packed, absmax = torch.ops.llmkit.quantize_nf4(w, 64)
    torch.library.opcheck(torch.ops.llmkit.dequantize_nf4.default, (packed, absmax, 64, [37, 29], torch.float16))
    offset = absmax.mean()
    q, absmax2 = torch.ops.llmkit.quantize_blockwise_8bit(absmax - offset, code, 256)
    torch.library.opcheck(torch.ops.llmkit.quantize_blockwise_8bit.default, (absmax - offset, code, 256))
    torch.library.opcheck(
        torch.ops.llmkit.dequantize_nf4.default,
        (packed, q, 64, [37, 29], torch.float32, absmax2, code, offset, 256),
    )


def test_torch_compile_fullgraph(device):
    def roundtrip(w):
        packed, state = quantize_nf4(w, 64, double_quant=True)
        return dequantize_nf4(packed, state, torch.float32) * 2

    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    w = random_weights((123, 45), torch.bfloat16, device)
    assert torch.equal(compiled(w), roundtrip(w))


# ------------------------------------------------------------- bad input --


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_rejects_unsupported_dtypes(dtype):
    w = torch.ones(64, dtype=dtype)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two in \\[32, 4096\\]"):
        quantize_nf4(torch.randn(256), blocksize)


def test_rejects_non_tensor_and_empty():
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 5))
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize_nf4(torch.randn(64), 64.0)


def test_rejects_mismatched_packed_and_state():
    packed, state = quantize_nf4(torch.randn(100, 64), 64)
    with pytest.raises(ValueError, match="packed holds"):
        dequantize_nf4(packed[:-1], state)
    _, other = quantize_nf4(torch.randn(10, 64), 64)
    with pytest.raises(ValueError, match="another tensor"):
        dequantize_nf4(packed, other)
    with pytest.raises(TypeError, match="out_dtype"):
        dequantize_nf4(packed, state, torch.float64)
    with pytest.raises(TypeError, match="NF4State"):
        dequantize_nf4(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="packed must be uint8"):
        torch.ops.llmkit.dequantize_nf4(packed.float(), state.absmax, 64, [100, 64], torch.float32)
    with pytest.raises(ValueError, match="absmax has"):
        torch.ops.llmkit.dequantize_nf4(packed, state.absmax[:-1], 64, [100, 64], torch.float32)


def test_rejects_broken_nested_state():
    packed, state = quantize_nf4(torch.randn(1000, 64), 64, double_quant=True)
    args = (packed, state.absmax, 64, [1000, 64], torch.float32)
    with pytest.raises(ValueError, match="go together"):
        torch.ops.llmkit.dequantize_nf4(*args, state.state2.absmax, None, state.offset)
    with pytest.raises(ValueError, match="nested_absmax has"):
        torch.ops.llmkit.dequantize_nf4(*args, state.state2.absmax[:1], state.state2.code, state.offset)
    with pytest.raises(ValueError, match="256 entries"):
        torch.ops.llmkit.dequantize_nf4(*args, state.state2.absmax, state.state2.code[:16], state.offset)
    with pytest.raises(TypeError, match="uint8 codes"):
        torch.ops.llmkit.dequantize_nf4(
            packed, state.absmax.float(), 64, [1000, 64], torch.float32, state.state2.absmax, state.state2.code,
            state.offset,
        )


def test_rejects_fp4_and_foreign_states():
    packed, state = quantize_nf4(torch.randn(64), 64)
    d = state.as_dict()
    d["quant_type"] = "fp4"
    with pytest.raises(ValueError, match="NF4"):
        NF4State.from_dict(d)
    with pytest.raises(ValueError, match="lacks"):
        NF4State.from_dict({"absmax": state.absmax})


def test_cuda_tensor_on_cpu_only_build(monkeypatch):
    """A CUDA tensor given to a build without CUDA kernels gets a clear error
    (fake CUDA tensors: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(llmkit._C, "built_with_cuda", lambda: False)
    with FakeTensorMode():
        w = torch.empty(128, device="cuda")
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            quantize_nf4(w)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cpu_and_cuda_agree():
    w = random_weights((1000, 1001), torch.bfloat16, "cpu", seed=4)
    p_cpu, s_cpu = quantize_nf4(w, 64)
    p_gpu, s_gpu = quantize_nf4(w.cuda(), 64)
    assert torch.equal(p_cpu, p_gpu.cpu())
    assert_same_state(s_cpu, s_gpu.to("cpu"))
    assert torch.equal(dequantize_nf4(p_gpu, s_gpu).cpu(), dequantize_nf4(p_cpu, s_cpu))
    # Double quant: offset = mean(absmax) is a torch reduction whose rounding may
    # differ between devices; the 8-bit codes of the same input may not.
    x = s_cpu.absmax - s_cpu.absmax.mean()
    code = dynamic_map()
    q_cpu, a_cpu = torch.ops.llmkit.quantize_blockwise_8bit(x, code, 256)
    q_gpu, a_gpu = torch.ops.llmkit.quantize_blockwise_8bit(x.cuda(), code.cuda(), 256)
    assert torch.equal(q_cpu, q_gpu.cpu()) and torch.equal(a_cpu, a_gpu.cpu())
    p_cpu, s_cpu = quantize_nf4(w, 64, True)
    p_gpu, s_gpu = quantize_nf4(w.cuda(), 64, True)
    s_gpu = s_gpu.to("cpu")
    s_cpu.offset, s_cpu.absmax, s_cpu.state2.absmax = s_gpu.offset, s_gpu.absmax, s_gpu.state2.absmax
    assert torch.equal(dequantize_nf4(p_gpu.cpu(), s_gpu), dequantize_nf4(p_cpu, s_cpu))


def test_dequantize_into_out_buffer(device):
    w = random_weights((257, 130), torch.float32, device, seed=8)
    for dq in (False, True):
        packed, state = quantize_nf4(w, 64, dq)
        for dtype in DTYPES:
            buf = torch.full(w.shape, float("nan"), dtype=dtype, device=device)  # poisoned
            result = dequantize_nf4(packed, state, out=buf)
            assert result.data_ptr() == buf.data_ptr()
            assert torch.equal(buf, ref.dequantize_nf4(packed, state, dtype))
    packed, state = quantize_nf4(w, 64)
    # a buffer that is a view at an odd element offset: no aligned vector stores
    backing = torch.full((w.numel() + 1,), float("nan"), device=device)
    shifted = backing[1:].view(w.shape)
    dequantize_nf4(packed, state, out=shifted)
    assert torch.equal(shifted, ref.dequantize_nf4(packed, state)) and backing[0].isnan()
    with pytest.raises(ValueError, match="out has shape"):
        dequantize_nf4(packed, state, out=torch.empty(257, 129, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4(packed, state, out=torch.empty(130, 257, device=device).t())
    with pytest.raises(TypeError, match="disagrees"):
        dequantize_nf4(packed, state, torch.float16, out=torch.empty(257, 130, device=device))
    args = (packed, state.absmax, 64, [257, 130], torch.bfloat16)
    torch.library.opcheck(
        torch.ops.llmkit.dequantize_nf4_into.default, args,
        {"out": torch.empty(257, 130, dtype=torch.bfloat16, device=device)}
    )


def test_large_output_path(device):
    """Outputs of 16 MiB and more are allocated 2 MiB-aligned (huge pages) on the CPU."""
    w = random_weights((4096, 1024), torch.float32, device, seed=12)
    packed, state = quantize_nf4(w, 64, double_quant=True)
    out = dequantize_nf4(packed, state)
    assert out.shape == w.shape and out.is_contiguous()
    assert torch.equal(out, ref.dequantize_nf4(packed, state))
    out.add_(1)  # writable, and freed without error when dropped
    del out


def test_blockwise_8bit_wrapper(device):
    from llmkit.ops import quantize_blockwise_8bit

    x = random_weights((1000,), torch.float32, device, seed=13)
    q, absmax = quantize_blockwise_8bit(x)
    q_ref, absmax_ref = ref.quantize_blockwise_8bit(x, dynamic_map().to(device), 256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    with pytest.raises(TypeError, match="float32"):
        quantize_blockwise_8bit(x.double())
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise_8bit(x, dynamic_map().flip(0).to(device))
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise_8bit(x, dynamic_map()[:128].to(device))
    with pytest.raises(ValueError, match="power of two"):
        quantize_blockwise_8bit(x, blocksize=100)


# ----------------------------------------------------- bitsandbytes call sites --


def test_bitsandbytes_call_sites():
    """quantize_nf4 takes bitsandbytes' quantize_4bit keywords (compress_statistics, quant_type,
    quant_storage); double_quant stays as llmkit's alias; what llmkit lacks raises naming it."""
    w = random_weights((70, 64), torch.bfloat16, "cpu", seed=21)
    packed, state = quantize_nf4(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.uint8)
    packed_ref, state_ref = ref.quantize_nf4(w, 64, True)
    assert torch.equal(packed, packed_ref)
    assert_same_state(state, state_ref)
    alias_packed, alias_state = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(alias_packed, packed)
    assert_same_state(alias_state, state)
    assert quantize_nf4(w, blocksize=64, compress_statistics=False)[1].state2 is None
    with pytest.raises(NotImplementedError, match="fp4"):
        quantize_nf4(w, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type"):
        quantize_nf4(w, quant_type="int4")
    with pytest.raises(NotImplementedError, match="quant_storage"):
        quantize_nf4(w, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="disagree"):
        quantize_nf4(w, compress_statistics=True, double_quant=False)
    if bnbF is not None:
        peer = bnb_check("quantize_4bit(bfloat16 (70, 64), blocksize=64, compress_statistics=True)")
        packed_b, state_b = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                               quant_storage=torch.uint8)
        if peer.agrees("packed bytes", packed_b, packed_ref):
            assert torch.equal(packed, packed_b)
            assert_same_state(state, NF4State.from_bnb(state_b))
        peer.finish()
