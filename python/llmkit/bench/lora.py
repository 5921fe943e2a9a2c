"""LoRA forward+backward: llmkit's fused lora_linear vs PEFT, over a dense and an NF4 base.

`llmkit bench lora`. One frozen layer (4096x4096; 1024x1024 with --quick),
LoRA r=16, lora_alpha=16 (PEFT's names throughout), 2048 tokens (256 with --quick), x requiring grad as in
a network (the gradient flows on to earlier layers). Each call is one
forward and one backward; adapter grads are reset between calls.
Contenders on the same weights and input:
  llmkit        llmkit.ops.lora_linear (one op, backward from x and a seed)
  peft          peft.get_peft_model over nn.Linear (or bitsandbytes Linear4bit for NF4)
  frozen layer  the frozen base layer alone (nn.Linear, or llmkit's nf4_linear):
                the floor any LoRA implementation sits on
The "GB/s in" column is GFLOP/s of the base layer's two products (2 x 2 M N K).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register
from .harness import Benchmark, Case, Contender, RunOptions
from .nf4 import packed_bytes, state_bytes

OURS = "llmkit"
R, LORA_ALPHA = 16, 16
SHAPE, QUICK_SHAPE = (4096, 4096), (1024, 1024)
TOKENS, QUICK_TOKENS = 2048, 256
CUDA_TOKENS = 8192


class _OneLayer(nn.Module):
    """The smallest model PEFT can wrap: one named linear layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _make_inputs(in_f, out_f, tokens, device, dtype, nf4):
    def make():
        import llmkit

        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device, dtype)
        A = (torch.rand(R, in_f, generator=gen) * 2 - 1).div(math.sqrt(in_f)).to(device, dtype)
        B = (torch.randn(out_f, R, generator=gen) * 0.01).to(device, dtype)  # nonzero: the path is real
        x = torch.randn(tokens, in_f, generator=gen).to(device, dtype)
        dy = torch.randn(tokens, out_f, generator=gen).to(device, dtype)
        t = {"w": w, "A": A, "B": B, "x": x, "dy": dy}
        if nf4:
            t["packed"], t["state"] = llmkit.ops.quantize_nf4(w, 64, double_quant=True)
        return t

    return make


def _peft_model(t, nf4: bool, lora_dropout: float):
    import peft

    out_f, in_f = t["w"].shape
    if nf4:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=t["x"].dtype, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(t["packed"], requires_grad=False, quant_state=t["state"].to_bnb(),
                                         quant_type="nf4", bnb_quantized=True)
    else:
        layer = nn.Linear(in_f, out_f, bias=False, device=t["w"].device, dtype=t["w"].dtype)
        layer.weight.data.copy_(t["w"])
    config = peft.LoraConfig(r=R, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout, target_modules=["proj"])
    model = peft.get_peft_model(_OneLayer(layer).to(t["x"].device), config)
    lora = model.base_model.model.proj
    lora.lora_A["default"].weight.data.copy_(t["A"])
    lora.lora_B["default"].weight.data.copy_(t["B"])
    return model, [lora.lora_A["default"].weight, lora.lora_B["default"].weight]


def _fwd_bwd(forward, x, dy, params):
    def call():
        for p in params:
            p.grad = None
        x.grad = None
        y = forward(x)
        y.backward(dy)
        return y.detach(), x.grad, params[0].grad if params else None

    return call


def _contender(name: str, nf4: bool, lora_dropout: float) -> Contender:
    def setup(t):
        import llmkit

        x = t["x"].detach().clone().requires_grad_()
        dy = t["dy"]
        base = (t["packed"], t["state"]) if nf4 else t["w"]
        if name == OURS:
            A = t["A"].clone().requires_grad_()
            B = t["B"].clone().requires_grad_()
            return _fwd_bwd(lambda x: llmkit.ops.lora_linear(x, base, None, A, B, LORA_ALPHA / R, lora_dropout), x,
                            dy, [A, B])
        if name == "peft":
            model, params = _peft_model(t, nf4, lora_dropout)
            return _fwd_bwd(model, x, dy, params)
        if name == "frozen layer":
            if nf4:
                return _fwd_bwd(lambda x: llmkit.ops.nf4_linear(x, *base), x, dy, [])
            w = t["w"]
            return _fwd_bwd(lambda x: x @ w.T, x, dy, [])
        raise ValueError(name)

    return Contender(name, setup, ours=name == OURS)


def _check(lora_dropout: float):
    def check(outputs: dict) -> dict[str, str]:
        if OURS not in outputs:
            return {}
        y, dx, dA = outputs[OURS]
        notes = {}
        for name, (y2, dx2, dA2) in outputs.items():
            if name == OURS:
                continue
            rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
            parts = [f"y {rel(y2, y):.1g}", f"dx {rel(dx2, dx):.1g}"]
            if dA2 is not None:
                parts.append(f"dA {rel(dA2, dA):.1g}")
            what = " (dropout masks differ)" if lora_dropout and name == "peft" else ""
            notes[name] = "max rel diff vs llmkit: " + ", ".join(parts) + what
        return notes

    return check


def lora_cases(opts: RunOptions) -> list[Case]:
    cases = []
    devices = [d for d in opts.devices if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    for device in devices:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        in_f, out_f = QUICK_SHAPE if opts.quick else SHAPE
        tokens = (QUICK_TOKENS if opts.quick else TOKENS) if device == "cpu" else CUDA_TOKENS
        numel = in_f * out_f
        for nf4, lora_dropout in ((False, 0.0), (False, 0.05), (True, 0.0)):
            base = "nf4" if nf4 else str(dtype).removeprefix("torch.")
            notes = []
            if nf4:
                per_param = (packed_bytes(numel) + state_bytes(numel, True)) / numel
                notes.append(f"QLoRA base weight: {per_param:.4f} bytes/parameter (NF4 + double-quantized absmax)")
            names = [OURS, "peft"] + (["frozen layer"] if lora_dropout == 0.0 else [])
            cases.append(Case(
                name=f"lora fwd+bwd {base} {in_f}x{out_f} r{R} tokens {tokens}"
                     + (f" dropout {lora_dropout}" if lora_dropout else ""),  # the name results and README quote
                device=device,
                bytes_in=4 * tokens * numel,  # FLOPs of the base layer's forward + input-gradient products
                bytes_moved=tokens * (in_f + out_f) * dtype.itemsize * 3,
                contenders=[_contender(n, nf4, lora_dropout) for n in names],
                make_inputs=_make_inputs(in_f, out_f, tokens, device, dtype, nf4),
                params={"op": "lora_linear fwd+bwd", "in_features": in_f, "out_features": out_f, "r": R,
                        "lora_alpha": LORA_ALPHA, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
                        "base": "nf4" if nf4 else "dense", "lora_dropout": lora_dropout,
                        "rate_column": "GB/s in = GFLOP/s"},
                check=_check(lora_dropout),
                notes=notes,
                max_call_s=30.0,
                budget_s=None if opts.quick else 10.0,  # ~1 s calls: 10 samples each, not 3
            ))
    return cases


register(Benchmark(
    name="lora",
    description=f"LoRA r={R} forward+backward over a frozen layer: llmkit lora_linear vs PEFT "
                "(GB/s in column = GFLOP/s of the base products)",
    cases=lora_cases,
))
