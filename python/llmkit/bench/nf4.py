"""NF4 quantize / dequantize throughput: llmkit vs bitsandbytes vs the pure-PyTorch reference.

Cases: a 4096x4096 weight (1024x1024 with --quick) in fp32 and bf16,
blocksize 64, with and without double quantization, dequantize into a fresh
tensor and into a reused buffer (out=), on the CPU and, when
there is one, on the GPU (llmkit vs bitsandbytes; the reference is a CPU
yardstick). GB/s counts the input read: the float weight for quantize, the
packed codes + absmax for dequantize. The copy-floor column counts bytes
read + written.
"""
from __future__ import annotations

import math

import torch

from . import register
from .harness import Benchmark, Case, Contender, RunOptions

BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256  # bitsandbytes' blocks of 8-bit absmax codes
SHAPE, QUICK_SHAPE = (4096, 4096), (1024, 1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# Each implementation: a loader (imported lazily: a missing peer or an unbuilt
# extension only marks that contender unavailable) returning (quantize, dequantize)
# with llmkit's calling convention.


def _llmkit():
    from llmkit import ops

    return ops.quantize_nf4, ops.dequantize_nf4


def _reference():
    from llmkit.ops import reference

    return reference.quantize_nf4, reference.dequantize_nf4


def _bitsandbytes():
    import bitsandbytes.functional as bnbf

    def quantize(w, blocksize, double_quant):
        return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)

    return quantize, bnbf.dequantize_4bit


IMPLEMENTATIONS = {"llmkit": _llmkit, "bitsandbytes": _bitsandbytes, "reference": _reference}
OURS = "llmkit"


def contender_names(device: str) -> list[str]:
    return ["llmkit", "bitsandbytes", "reference"] if device == "cpu" else ["llmkit", "bitsandbytes"]


def state_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of the absmax statistics (the fixed 1 KiB code tables are left out)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    if not double_quant:
        return 4 * blocks  # fp32 absmax per block
    # uint8 code per block + fp32 absmax per 256 codes + the fp32 offset
    return blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE) + 4


def packed_bytes(numel: int) -> int:
    return (numel + 1) // 2


# --------------------------------------------------------------------------- output checks


def _baseline(outputs: dict) -> str:
    return OURS if OURS in outputs else next(iter(outputs))


def state_tensors(state) -> dict[str, torch.Tensor]:
    """The stored statistics of an NF4 state (ours or bitsandbytes' QuantState)."""
    tensors = {"absmax": state.absmax}
    if getattr(state, "state2", None) is not None:
        tensors["nested absmax"] = state.state2.absmax
        tensors["offset"] = torch.as_tensor(state.offset)
    return tensors


def compare_quantized(ours, theirs, label: str) -> str:
    """One line saying whether two (packed, state) pairs hold the same bytes."""
    (packed_a, state_a), (packed_b, state_b) = ours, theirs
    if packed_a.numel() != packed_b.numel():
        return f"packed size {packed_b.numel()} != {label}'s {packed_a.numel()}"
    tensors_a, tensors_b = state_tensors(state_a), state_tensors(state_b)
    if tensors_a.keys() != tensors_b.keys():
        return f"state holds {sorted(tensors_b)}, {label}'s holds {sorted(tensors_a)}"
    # Count differing elements: a rate would round one odd byte in millions to 0%.
    differing = {"packed bytes": (packed_a.flatten().cpu() != packed_b.flatten().cpu(), None)}
    for key in tensors_a:
        a, b = tensors_a[key].float().cpu().flatten(), tensors_b[key].float().cpu().flatten()
        differing[key] = (a != b, (a - b).abs().max().item())
    if not any(mask.any() for mask, _ in differing.values()):
        return f"same {', '.join(differing)} as {label}"
    return f"differs from {label}: " + ", ".join(
        f"{key} {int(mask.sum())}/{mask.numel()}" + (f" (max |diff| {diff:.3g})" if diff else "")
        for key, (mask, diff) in differing.items() if mask.any())


def check_quantized(outputs: dict) -> dict[str, str]:
    """Compare every contender's packed codes and state with llmkit's (else the first one's)."""
    base = _baseline(outputs)
    return {name: compare_quantized(outputs[base], out, base) for name, out in outputs.items() if name != base}


def check_dequantized(outputs: dict) -> dict[str, str]:
    base = _baseline(outputs)
    notes = {}
    for name, out in outputs.items():
        if name != base:
            diff = (out.float().cpu() - outputs[base].float().cpu()).abs().max().item()
            notes[name] = f"max |out - {base} out| = {diff:.3g} (each dequantizes its own quantize output)"
    return notes


# --------------------------------------------------------------------------- cases


def _weight_maker(shape, dtype, device):
    def make_inputs():
        gen = torch.Generator().manual_seed(0)  # the same weight for every run, without touching the global seed
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    return make_inputs


def _quantize_contender(name, double_quant):
    def setup(w):
        quantize, _ = IMPLEMENTATIONS[name]()
        return lambda: quantize(w, blocksize=BLOCKSIZE, double_quant=double_quant)

    return Contender(name, setup, ours=name == OURS)


def _dequantize_contender(name, double_quant):
    def setup(w):
        quantize, dequantize = IMPLEMENTATIONS[name]()
        packed, state = quantize(w, blocksize=BLOCKSIZE, double_quant=double_quant)  # each from its own state
        return lambda: dequantize(packed, state)

    return Contender(name, setup, ours=name == OURS)


def _dequantize_into_contender(name, double_quant):
    """Dequantize into one reused buffer (bitsandbytes' and llmkit's `out=`): what
    a layer with a workspace does, and the kernel's speed without the page
    faults of a fresh output allocation."""
    def setup(w):
        quantize, dequantize = IMPLEMENTATIONS[name]()
        packed, state = quantize(w, blocksize=BLOCKSIZE, double_quant=double_quant)
        buffer = torch.empty_like(w)
        return lambda: dequantize(packed, state, out=buffer)

    return Contender(name, setup, ours=name == OURS)


def nf4_cases(opts: RunOptions) -> list[Case]:
    shape = QUICK_SHAPE if opts.quick else SHAPE
    numel = shape[0] * shape[1]
    devices = [d for d in opts.devices if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    cases = []
    for device in devices:
        for op in ("quantize", "dequantize", "dequantize-into"):
            for dtype_name, dtype in DTYPES.items():
                for double_quant in (False, True):
                    float_bytes = numel * dtype.itemsize
                    codes_bytes = packed_bytes(numel) + state_bytes(numel, double_quant)
                    quantize = op == "quantize"
                    make = {"quantize": _quantize_contender, "dequantize": _dequantize_contender,
                            "dequantize-into": _dequantize_into_contender}[op]
                    names = contender_names(device)
                    if op == "dequantize-into":  # the reference, and bitsandbytes on CPU, have no out= kernel
                        names = [n for n in names if n == OURS or (n == "bitsandbytes" and device == "cuda")]
                    cases.append(Case(
                        name=f"{op} {dtype_name} {shape[0]}x{shape[1]}" + (" dq" if double_quant else ""),
                        device=device,
                        bytes_in=float_bytes if quantize else codes_bytes,
                        bytes_moved=float_bytes + codes_bytes,
                        contenders=[make(n, double_quant) for n in names],
                        make_inputs=_weight_maker(shape, dtype, device),
                        params={"op": op, "dtype": dtype_name, "shape": list(shape),
                                "blocksize": BLOCKSIZE, "double_quant": double_quant},
                        check=check_quantized if quantize else check_dequantized,
                    ))
    from .nf4_linear import nf4_linear_cases  # the fused matmul, in the same run

    return cases + nf4_linear_cases(opts)


register(Benchmark(
    name="nf4",
    description="NF4 quantize/dequantize and the fused nf4_linear, blocksize 64 (dq = double quant); "
                "GB/s = input read (quantize: float weight; dequantize, nf4_linear: packed + absmax)",
    cases=nf4_cases,
))
