"""The fused NF4 matmul (QLoRA's frozen base): llmkit.ops.nf4_linear vs its peers.

Part of `llmkit bench nf4`. Layers 4096x4096 and 4096 -> 11008 (Llama-7B's
up projection; 1024x1024 with --quick), NF4 with double quant, blocksize 64.
Contenders on the same layer and input:
  llmkit        nf4_linear (batch 1: decode GEMV; batches: dequantized tiles + GEMM)
  dense         x @ W.T with W in full precision (fp32 on the CPU, bf16 on CUDA):
                what the 4-bit layer replaces, reading 8x (4x) more bytes
  dequant+mm    dequantize_nf4 (ours) into a fresh W, then x @ W.T: the unfused way
  bitsandbytes  bitsandbytes.matmul_4bit (its CPU / CUDA kernels)
GB/s in counts the NF4 weight read (packed + absmax statistics); at batch 1
that read is the floor of a decode step, and the floor column compares it
(plus x and y) with the copy bandwidth.
"""
from __future__ import annotations

import torch

from .harness import Case, Contender, RunOptions
from .nf4 import packed_bytes, state_bytes

LAYERS = [(4096, 4096), (4096, 11008)]  # (in_features, out_features)
QUICK_LAYERS = [(1024, 1024)]
CPU_ROWS, QUICK_CPU_ROWS = [1, 64, 512, 2048], [1, 64]
CUDA_ROWS = [1, 16, 2048]
DENSE_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
OURS = "llmkit"


def _make_inputs(in_f, out_f, rows, device, dtype):
    def make():
        import llmkit

        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device)
        packed, state = llmkit.ops.quantize_nf4(w, 64, double_quant=True)
        x = torch.randn(rows, in_f, generator=gen).to(device, dtype)
        return {"w": w.to(dtype), "packed": packed, "state": state, "x": x}

    return make


def _contender(name: str) -> Contender:
    def setup(t):
        import llmkit

        x, packed, state = t["x"], t["packed"], t["state"]
        if name == OURS:
            return lambda: llmkit.ops.nf4_linear(x, packed, state)
        if name == "dense":
            w = t["w"]
            return lambda: x @ w.T
        if name == "dequant+mm":
            return lambda: x @ llmkit.ops.dequantize_nf4(packed, state, x.dtype).T
        if name == "bitsandbytes":
            import bitsandbytes as bnb

            qs = state.to_bnb()
            return lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)
        raise ValueError(name)

    return Contender(name, setup, ours=name == OURS)


def _check(outputs: dict) -> dict[str, str]:
    """Every contender's y against dequant+mm (the same 4-bit weight; dense differs by the quantization)."""
    if OURS not in outputs:
        return {}
    ours = outputs[OURS].float()
    notes = {}
    for name, out in outputs.items():
        if name != OURS:
            rel = ((out.float() - ours).abs().max() / ours.abs().max()).item()
            what = " (quantization error)" if name == "dense" else ""
            notes[name] = f"max |y - llmkit y| / max |y| = {rel:.2g}{what}"
    return notes


def nf4_linear_cases(opts: RunOptions) -> list[Case]:
    cases = []
    devices = [d for d in opts.devices if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    for device in devices:
        dtype = DENSE_DTYPE[device]
        rows_list = (QUICK_CPU_ROWS if opts.quick else CPU_ROWS) if device == "cpu" else CUDA_ROWS
        for in_f, out_f in QUICK_LAYERS if opts.quick else LAYERS:
            numel = in_f * out_f
            weight_bytes = packed_bytes(numel) + state_bytes(numel, True)
            for rows in rows_list:
                io = rows * (in_f + out_f) * dtype.itemsize
                names = [OURS, "dense", "dequant+mm", "bitsandbytes"]
                cases.append(Case(
                    name=f"nf4_linear {str(dtype).removeprefix('torch.')} {in_f}->{out_f} batch {rows}",
                    device=device,
                    bytes_in=weight_bytes,
                    bytes_moved=weight_bytes + io,
                    contenders=[_contender(n) for n in names],
                    make_inputs=_make_inputs(in_f, out_f, rows, device, dtype),
                    params={"op": "nf4_linear", "in_features": in_f, "out_features": out_f, "rows": rows,
                            "dtype": str(dtype).removeprefix("torch."), "blocksize": 64, "double_quant": True,
                            "flops": 2 * rows * numel},
                    check=_check,
                    max_call_s=10.0,
                ))
    return cases
