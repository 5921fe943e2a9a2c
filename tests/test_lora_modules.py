"""Linear4bit and LoraLinear: against the float64 reference always, against bitsandbytes / PEFT where they work.

Every test checks llmkit against ``llmkit.ops.reference`` (float64, or the
NF4 reference quantizer byte for byte) first, on fresh random inputs at odd
sizes. The peer comparison comes after, and the peer is itself checked
against the same reference: where bitsandbytes or PEFT fails or is wrong on
this CPU (bitsandbytes 0.50's eval-mode CPU path on AVX-512 asserts
``N % 32 == 0``, needs K a multiple of the block size, and computes in
bfloat16 whatever ``compute_dtype`` says), the test is skipped with a reason
naming the peer, its version, the CPU capability and the case -- after our
own checks have passed. So a peer's bug neither fails CI nor hides ours.

The peer is built from the same weights (bitsandbytes quantizes the same
dense weight) and our adapter (B random, so the LoRA path matters) is copied
into PEFT's. Dropout is compared through its mask: our op gets an explicit
seed, and PEFT's dropout module is replaced by a multiplication with the
same mask.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import llmkit.ops
from llmkit.nn import Linear4bit, LoraLinear
from llmkit.nn.linear4bit import dense_weight
from llmkit.ops import NF4State, quantize_nf4
from llmkit.ops import reference

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

IN, OUT, R = 70, 30, 4  # odd sizes: the last NF4 block of the weight is partial
SEED = 1234
CPU = torch.backends.cpu.get_cpu_capability()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------- peer helpers --


def peer_skip(case: str, detail: str):
    pytest.skip(f"peer wrong on this machine (llmkit's own checks passed): bitsandbytes {bnb.__version__}, "
                f"peft {peft.__version__}, CPU capability {CPU}: {case}: {detail}")


def call_peer(fn, case: str):
    """Run a peer computation; a peer failure (bitsandbytes' asserts, shape errors) skips."""
    try:
        return fn()
    except (AssertionError, RuntimeError) as exc:
        peer_skip(case, f"{type(exc).__name__}: {exc}")


def check_peer(peer: torch.Tensor, ref: torch.Tensor, rel: float, case: str) -> None:
    """Skip unless the peer's result is within `rel` of the reference (bf16-level errors named as such)."""
    err = rel_err(peer, ref)
    if not err < rel:
        hint = " (a bfloat16-level error)" if err < 2e-2 else ""
        peer_skip(case, f"rel err {err:.2g} vs the float64 reference, bound {rel:g}{hint}")


def check_peer_bytes(peer: torch.Tensor, ref: torch.Tensor, case: str) -> None:
    if not torch.equal(peer, ref):
        peer_skip(case, f"{int((peer != ref).sum())} of {peer.numel()} bytes differ from the reference quantizer")


def bnb_linear4bit(linear: nn.Linear, compute_dtype=None) -> "bnb.nn.Linear4bit":
    """bitsandbytes' NF4 Linear4bit (double quant) quantized from `linear` on the CPU."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    layer = layer.to(linear.weight.dtype)  # not quantized yet: keeps the dtype the state records
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)  # quantizes


class One(nn.Module):
    """A model of one layer named `proj`, for PEFT's get_peft_model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer
        # PEFT dispatches bitsandbytes layers to its Linear4bit only for models marked 4-bit.
        self.is_loaded_in_4bit = isinstance(layer, bnb.nn.Linear4bit)

    def forward(self, x):
        return self.proj(x)


def A(layer: LoraLinear, name: str = "default") -> torch.Tensor:
    return layer.lora_A[name].weight


def B(layer: LoraLinear, name: str = "default") -> torch.Tensor:
    return layer.lora_B[name].weight


def peft_layer(base: nn.Module, ours: LoraLinear):
    """PEFT's LoRA layer around `base` with our adapter's settings and weights."""
    config = peft.LoraConfig(target_modules=["proj"], r=ours.r["default"], lora_alpha=ours.lora_alpha["default"],
                             lora_dropout=ours.lora_dropout["default"], use_rslora=ours.use_rslora["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for Conv1D
        model = peft.get_peft_model(One(base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A(ours))
        layer.lora_B["default"].weight.copy_(B(ours))
    return model, layer


class MaskDropout(nn.Module):
    """Dropout with a given keep mask (inverted scaling), to stand in for PEFT's."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


@pytest.fixture
def fixed_seed(monkeypatch):
    """Make LoraLinear's op call use seed SEED (it draws one per call otherwise)."""
    calls = []
    op = llmkit.ops.lora_linear

    def seeded(*args, **kwargs):
        calls.append(kwargs.get("training"))
        kwargs["seed"] = SEED
        return op(*args, **kwargs)

    monkeypatch.setattr(llmkit.ops, "lora_linear", seeded)
    return calls


# ------------------------------------------------------------- Linear4bit --


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_matches_reference_and_bitsandbytes(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT).to(dtype)
    ours = Linear4bit.from_linear(dense)
    packed, state = reference.quantize_nf4(dense.weight.detach(), 64, double_quant=True)
    assert ours.weight.dtype == torch.uint8 and ours.weight.shape == ((IN * OUT + 1) // 2, 1)
    assert torch.equal(ours.weight, packed)
    torch.testing.assert_close(ours.dequantize(), reference.dequantize_nf4(packed, state), rtol=0, atol=0)
    assert (ours.dequantize() != dense.weight).any()  # quantized, not the dense weight
    x = torch.randn(5, 3, IN, dtype=dtype)
    y = ours(x)
    assert y.dtype == dtype and y.shape == (5, 3, OUT)
    expect = reference.nf4_linear(x, packed, state, dense.bias)
    rel = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(y, expect) < rel

    case = f"Linear4bit {IN}->{OUT} {dtype}, training mode"
    ref = bnb_linear4bit(dense, compute_dtype=dtype)
    check_peer_bytes(ref.weight.data, packed, case)
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)  # bitsandbytes' keys and bytes, both ways
    for key in ref_sd:
        assert torch.equal(sd[key], ref_sd[key]), key
    y_ref = call_peer(lambda: ref(x), case)
    check_peer(y_ref, expect, rel, case)
    assert rel_err(y, y_ref) < 2 * rel


def test_linear4bit_state_dict_both_ways():
    torch.manual_seed(1)
    dense = nn.Linear(IN, OUT)
    ref = bnb_linear4bit(dense, compute_dtype=torch.float32)
    x = torch.randn(4, IN)

    # bitsandbytes -> ours (a freshly initialised layer: different weights before loading)
    ours = Linear4bit(IN, OUT)
    assert not torch.equal(ours.weight, ref.weight.data)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.weight, ref.weight.data)
    expect = reference.nf4_linear(x, ours.weight, ours.quant_state, ours.bias)
    assert rel_err(ours(x), expect) < 1e-6
    packed, _ = reference.quantize_nf4(dense.weight.detach(), 64, double_quant=True)
    check_peer_bytes(ref.weight.data, packed, "bitsandbytes quantizing a float32 70x30 weight")
    assert torch.equal(ours.weight, packed)

    # ours -> bitsandbytes, the way transformers loads a prequantized checkpoint
    src = Linear4bit.from_linear(nn.Linear(IN, OUT))
    sd = src.state_dict()
    target = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    target.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=target)
    target.bias = nn.Parameter(sd["bias"])
    assert torch.equal(target.weight.data, src.weight)
    expect = reference.nf4_linear(x, src.weight, src.quant_state, src.bias)
    case = "bitsandbytes Linear4bit from llmkit's state_dict, training mode"
    check_peer(call_peer(lambda: target(x), case), expect, 1e-6, case)
    torch.testing.assert_close(target(x), src(x), rtol=1e-5, atol=1e-5)


def test_linear4bit_without_double_quant_and_other_blocksize():
    torch.manual_seed(2)
    dense = nn.Linear(IN, OUT, bias=False)
    ours = Linear4bit.from_linear(dense, blocksize=128, double_quant=False)
    packed, state = reference.quantize_nf4(dense.weight.detach(), 128, double_quant=False)
    assert torch.equal(ours.weight, packed) and torch.equal(ours.quant_state.absmax, state.absmax)
    sd = ours.state_dict()
    assert "bias" not in sd and "weight.nested_absmax" not in sd
    fresh = Linear4bit(IN, OUT, bias=False)  # blocksize 64, double quant: the checkpoint's settings win
    fresh.load_state_dict(sd)
    assert fresh.blocksize == 128 and not fresh.double_quant
    x = torch.randn(3, IN)
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)
    assert rel_err(fresh(x), reference.nf4_linear(x, packed, state)) < 1e-6

    peer_packed, qs = bnb.functional.quantize_4bit(dense.weight.detach(), blocksize=128, quant_type="nf4",
                                                   compress_statistics=False)
    check_peer_bytes(peer_packed, packed, "bitsandbytes quantize_4bit blocksize 128, no double quant")
    assert torch.equal(qs.absmax, ours.quant_state.absmax)


def test_linear4bit_loads_dense_state_dict_by_quantizing():
    torch.manual_seed(3)
    dense = nn.Linear(IN, OUT)
    layer = Linear4bit(IN, OUT)
    layer.load_state_dict(dense.state_dict())
    packed, _ = quantize_nf4(dense.weight.detach(), 64, double_quant=True)
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.weight, reference.quantize_nf4(dense.weight.detach(), 64, double_quant=True)[0])
    assert torch.equal(layer.bias, dense.bias)


def test_linear4bit_frozen_weight_gradients_to_input_and_bias():
    torch.manual_seed(4)
    layer = Linear4bit.from_linear(nn.Linear(IN, OUT))
    assert not layer.weight.requires_grad
    with pytest.raises(RuntimeError):
        layer.weight.requires_grad_(True)  # uint8 cannot require grad
    x = torch.randn(6, IN, dtype=torch.float64).float().requires_grad_()
    layer(x).square().sum().backward()
    w = layer.dequantize().double()
    y = x.detach().double() @ w.T + layer.bias.detach().double()
    torch.testing.assert_close(x.grad.double(), (2 * y) @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), (2 * y).sum(0), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def test_linear4bit_compute_dtype_and_dtype_casts():
    torch.manual_seed(5)
    dense = nn.Linear(IN, OUT)
    layer = Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16)
    x = torch.randn(4, IN)
    y = layer(x)
    assert y.dtype == torch.float32  # back in x's dtype, as bitsandbytes
    expect = reference.nf4_linear(x, layer.weight, layer.quant_state, dense.bias)
    assert rel_err(y, expect) < 2e-2  # bf16 compute
    case = "Linear4bit compute_dtype bfloat16, float32 input, training mode"
    ref = bnb_linear4bit(dense, compute_dtype=torch.bfloat16)
    y_ref = call_peer(lambda: ref(x), case)
    check_peer(y_ref, expect, 2e-2, case)
    assert rel_err(y, y_ref) < 2e-2
    layer.half()  # only the bias is a float tensor; the absmax state stays float32
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert layer.quant_state.state2.absmax.dtype == torch.float32


def test_linear4bit_to_device_moves_state(device):
    torch.manual_seed(6)
    layer = Linear4bit(IN, OUT)
    x = torch.randn(2, IN)
    expect = x.double() @ layer.dequantize().double().T + layer.bias.detach().double()
    moved = copy.deepcopy(layer).to(device)
    assert moved.weight.device.type == device
    s = moved.quant_state
    for t in (s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code):
        assert t.device.type == device
    torch.testing.assert_close(moved(x.to(device)).cpu().double(), expect, rtol=1e-5, atol=1e-5)
    meta = copy.deepcopy(layer).to("meta")
    assert meta.quant_state.absmax.device.type == "meta"


def test_linear4bit_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="quantized already"):
        Linear4bit.from_linear(Linear4bit(8, 8))
    with pytest.raises(TypeError, match="bitsandbytes.*Linear4bit"):  # an nn.Linear subclass with packed bytes
        Linear4bit.from_linear(bnb_linear4bit(nn.Linear(IN, OUT)))
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit(IN, OUT, compute_dtype=torch.int8)
    sd = Linear4bit(IN, OUT).state_dict()
    with pytest.raises(RuntimeError, match="shape"):
        Linear4bit(IN + 2, OUT).load_state_dict(sd)
    bad = dict(sd)
    bad["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax"):
        Linear4bit(IN, OUT).load_state_dict(bad)
    no_state = {"weight": sd["weight"], "bias": sd["bias"]}
    with pytest.raises(RuntimeError, match="quant state"):
        Linear4bit(IN, OUT).load_state_dict(no_state)
    fp4 = bnb.nn.Linear4bit(IN, OUT, quant_type="fp4").to("cpu").state_dict()
    with pytest.raises(RuntimeError, match="(?i)fp4"):
        Linear4bit(IN, OUT).load_state_dict(fp4)
    with pytest.raises(RuntimeError, match="Missing key"):
        Linear4bit(IN, OUT).load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        Linear4bit(IN, OUT).load_state_dict(dict(sd, extra=sd["bias"]))
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        Linear4bit(IN, OUT, bias=False).load_state_dict(sd)


def test_linear4bit_from_conv1d_is_transposed():
    torch.manual_seed(7)
    conv = Conv1D(OUT, IN)  # weight (in, out)
    with torch.no_grad():
        conv.bias.normal_()
    layer = Linear4bit.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    packed, _ = quantize_nf4(conv.weight.detach().T.contiguous(), 64, double_quant=True)
    assert torch.equal(layer.weight, packed)
    x = torch.randn(3, IN)
    expect = x.double() @ layer.dequantize().double().T + conv.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), expect, rtol=1e-5, atol=1e-5)
    assert rel_err(layer(x).detach(), conv(x).detach()) < 0.15  # close to the unquantized layer


# ------------------------------------------------------------- LoraLinear --


def make_lora(base: nn.Module, r=R, alpha=8, dropout=0.0, rslora=False) -> LoraLinear:
    layer = LoraLinear(base, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora)
    with torch.no_grad():
        B(layer).normal_(0, 0.5)  # PEFT's init leaves B zero: make the adapter matter
    return layer


def reference_outputs(ours: LoraLinear, x: torch.Tensor, g: torch.Tensor, dropout: bool):
    """Float64 reference forward and gradients (x, A, B) of the active adapter of `ours`,
    the dropout mask of seed SEED when `dropout`."""
    name = ours.active_adapter
    base = ours.base_layer
    if isinstance(base, Linear4bit):
        weight, bias = (base.weight, base.quant_state), base.bias
    else:
        weight, bias = dense_weight(base).detach(), base.bias
    xr = x.detach().double().requires_grad_()
    Ar = A(ours, name).detach().double().requires_grad_()
    Br = B(ours, name).detach().double().requires_grad_()
    p = ours.lora_dropout[name] if dropout else 0.0
    y = reference.lora_linear(xr, weight, None if bias is None else bias.detach(), Ar, Br, ours.scaling[name], p,
                              SEED)
    (y * g.double()).sum().backward()
    return y.detach(), xr.grad, Ar.grad, Br.grad


def run(layer_or_model, x, g, grads):
    """Forward and backward of `layer_or_model` on a copy of x; returns (y, dx, dA, dB) with `grads` = (A, B)."""
    for p in grads:
        p.grad = None
    x1 = x.clone().requires_grad_()
    y = layer_or_model(x1)
    (y * g).sum().backward()
    return y.detach(), x1.grad, grads[0].grad, grads[1].grad


def assert_close_all(got, want, rel, names=("y", "dx", "dA", "dB")):
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b) < rel, (name, rel_err(a, b))


def check(ours: LoraLinear, x: torch.Tensor, rel: float, peer=None, case: str = "", dropout: bool = True):
    """`ours` against the float64 reference (forward and the gradients of x, A, B); then, with
    `peer` = (model, PEFT layer), the peer against the same reference (skip where it is wrong)
    and ours against the peer."""
    g = torch.randn(*x.shape[:-1], ours.out_features, dtype=x.dtype)
    got = run(ours, x, g, (A(ours), B(ours)))
    assert got[0].dtype == x.dtype
    want = reference_outputs(ours, x, g, dropout=dropout and ours.training)
    assert_close_all(got, want, rel)
    assert ours.base_layer.weight.grad is None
    if peer is None:
        return got
    model, ref = peer
    theirs = call_peer(lambda: run(model, x, g, (ref.lora_A["default"].weight, ref.lora_B["default"].weight)), case)
    for name, a, b in zip(("y", "dx", "dA", "dB"), theirs, want):
        check_peer(a, b, rel, f"{case}, {name}")
    assert_close_all(got, theirs, 2 * rel)
    return got


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_dense_matches_reference_and_peft(dtype, rel, rslora, fixed_seed):
    torch.manual_seed(10)
    base = nn.Linear(IN, OUT).to(dtype)
    ours = make_lora(copy.deepcopy(base), alpha=16, rslora=rslora)
    assert A(ours).dtype == torch.float32  # like PEFT's autocast_adapter_dtype
    model, ref = peft_layer(base, ours)
    assert ref.scaling["default"] == ours.scaling["default"]
    x = torch.randn(3, 5, IN, dtype=dtype)
    y = check(ours, x, rel, (model, ref), f"PEFT LoRA over nn.Linear {dtype}")[0]
    assert fixed_seed[0] is True  # the fused op, in training mode
    # the adapter contributes (B is random): the base alone is far off
    assert rel_err(y, base(x)) > 10 * rel


def test_lora_nf4_matches_reference_and_peft_over_bitsandbytes(fixed_seed):
    torch.manual_seed(11)
    dense = nn.Linear(IN, OUT)
    ours = make_lora(Linear4bit.from_linear(dense))
    bnb_base = bnb_linear4bit(dense, compute_dtype=torch.float32)
    assert torch.equal(ours.base_layer.weight, bnb_base.weight.data)
    model, ref = peft_layer(bnb_base, ours)
    assert type(ref).__name__ == "Linear4bit"  # PEFT's bitsandbytes LoRA layer
    check(ours, torch.randn(2, 7, IN), 1e-5, (model, ref), f"PEFT LoRA over bitsandbytes NF4 {IN}->{OUT}")


def dropout_case(nf4: bool, in_f: int, out_f: int, p: float = 0.3):
    torch.manual_seed(12)
    dense = nn.Linear(in_f, out_f)
    base = Linear4bit.from_linear(dense) if nf4 else copy.deepcopy(dense)
    return dense, make_lora(base, dropout=p), torch.randn(4, in_f)


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_dropout_matches_reference(nf4, fixed_seed):
    """Our fused dropout against the float64 reference with the same mask, in training
    and eval mode (no peer involved: this never skips)."""
    dense, ours, x = dropout_case(nf4, IN, OUT)
    keep = reference.lora_dropout_keep(x.shape, 0.3, SEED)
    assert 0 < keep.float().mean() < 1
    y = check(ours, x, 1e-5)[0]
    ours.eval()
    y_eval = check(ours, x, 1e-5)[0]
    assert fixed_seed[-1] is False
    assert rel_err(y, y_eval) > 1e-3  # dropout changed the training output


# (in, out) = (70, 30): odd, N % 32 != 0; (128, 32): N a multiple of 32 and K of the NF4 block (64), the
# shapes bitsandbytes' eval-mode CPU kernel accepts.
@pytest.mark.parametrize("in_f, out_f", [(IN, OUT), (128, 32)])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_dropout_matches_peft_through_the_mask(nf4, mode, in_f, out_f, fixed_seed):
    p = 0.3
    dense, ours, x = dropout_case(nf4, in_f, out_f, p)
    peer_base = bnb_linear4bit(dense, torch.float32) if nf4 else dense
    model, ref = peft_layer(peer_base, ours)
    if mode == "train":
        ref.lora_dropout["default"] = MaskDropout(reference.lora_dropout_keep(x.shape, p, SEED), p)
        check(ours, x, 1e-5, (model, ref), f"PEFT LoRA dropout {p}, {'NF4' if nf4 else 'dense'} {in_f}->{out_f}, "
                                           "training mode")
        return
    # eval: no dropout; x not requiring grad, as in inference (bitsandbytes' packed CPU path)
    ours.eval()
    model.eval()
    ref.lora_dropout["default"] = nn.Identity()
    with torch.no_grad():
        y = ours(x)
        base = ours.base_layer
        weight = (base.weight, base.quant_state) if nf4 else base.weight
        want = reference.lora_linear(x, weight, base.bias, A(ours), B(ours), ours.scaling["default"])
        assert rel_err(y, want) < 1e-5
        assert fixed_seed[-1] is False
        case = f"PEFT LoRA over {'bitsandbytes NF4' if nf4 else 'nn.Linear'} {in_f}->{out_f}, eval mode, no grad"
        theirs = call_peer(lambda: model(x), case)
    check_peer(theirs, want, 1e-5, case)
    assert rel_err(y, theirs) < 2e-5


def test_lora_dropout_draws_fresh_masks_from_torch_generator():
    torch.manual_seed(13)
    layer = make_lora(nn.Linear(IN, OUT), dropout=0.5)
    x = torch.randn(3, IN)
    torch.manual_seed(99)
    a, b = layer(x), layer(x)
    torch.manual_seed(99)
    assert not torch.equal(a, b)  # a new mask each call
    torch.testing.assert_close(layer(x), a, rtol=0, atol=0)  # reproducible from torch's seed


def test_lora_conv1d_matches_reference_and_peft(fixed_seed):
    torch.manual_seed(14)
    base = Conv1D(OUT, IN)
    with torch.no_grad():
        base.bias.normal_()
    ours = make_lora(copy.deepcopy(base))
    assert ours.fan_in_fan_out and A(ours).shape == (R, IN) and B(ours).shape == (OUT, R)
    model, ref = peft_layer(base, ours)
    assert ref.fan_in_fan_out
    check(ours, torch.randn(2, 3, IN), 1e-5, (model, ref), "PEFT LoRA over transformers Conv1D")
    # merging adds the transposed delta: W (in, out) + (scaling B A).T, as PEFT's
    w0 = ours.base_layer.weight.detach().double().clone()
    expect = w0 + (ours.scaling["default"] * B(ours).detach().double() @ A(ours).detach().double()).T
    with torch.no_grad():
        ours.merge()
        ref.merge()
    assert rel_err(ours.base_layer.weight, expect) < 1e-6
    torch.testing.assert_close(ours.base_layer.weight, ref.base_layer.weight, rtol=1e-6, atol=1e-6)


def test_lora_init_is_peft_default_and_variants():
    torch.manual_seed(15)
    base = nn.Linear(IN, OUT)
    layer = LoraLinear(base, r=R, lora_alpha=4)
    assert torch.count_nonzero(B(layer)) == 0
    bound = 1 / IN ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in))
    assert A(layer).abs().max() <= bound and A(layer).abs().max() > 0.8 * bound
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)  # a fresh adapter is a no-op
    assert LoraLinear(base, r=16, lora_alpha=8, use_rslora=True).scaling["default"] == 2.0
    assert LoraLinear(base, r=16, lora_alpha=8).scaling["default"] == 0.5
    # PEFT's "gaussian": A ~ N(0, 1/r), B zeros; False: B random too (the adapter changes the output)
    big = LoraLinear(nn.Linear(512, 64), r=8, init_lora_weights="gaussian")
    assert torch.count_nonzero(B(big)) == 0 and abs(A(big).std().item() - 1 / 8) < 0.01
    changed = LoraLinear(base, r=R, init_lora_weights=False)
    assert torch.count_nonzero(B(changed)) == B(changed).numel()
    assert rel_err(changed(x), base(x)) > 1e-3


def test_lora_layout_is_peft_in_memory_layout():
    """state_dict keys equal PEFT's layer's: a PEFT layer's state loads into ours and back."""
    torch.manual_seed(19)
    base = nn.Linear(IN, OUT)
    ours = make_lora(copy.deepcopy(base))
    model, ref = peft_layer(copy.deepcopy(base), ours)
    assert set(ours.state_dict()) == set(ref.state_dict())
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(B(ours), ref.lora_B["default"].weight)


def test_named_adapters_in_a_layer():
    torch.manual_seed(20)
    base = nn.Linear(IN, OUT)
    layer = make_lora(base)
    layer.update_layer("second", r=2, lora_alpha=6, lora_dropout=0.1, use_rslora=True)
    assert list(layer.lora_A) == ["default", "second"] and layer.active_adapter == "default"
    assert not A(layer, "second").requires_grad and A(layer).requires_grad  # a new adapter waits, frozen
    with torch.no_grad():
        B(layer, "second").normal_()
    x = torch.randn(3, IN)
    first = layer(x)
    layer.set_adapter("second")
    layer.eval()  # no dropout: compare with the reference of the second adapter
    assert layer.scaling["second"] == 6 / 2 ** 0.5
    expect = reference.lora_linear(x, base.weight.detach(), base.bias.detach(), A(layer, "second"),
                                   B(layer, "second"), layer.scaling["second"])
    assert rel_err(layer(x).detach(), expect) < 1e-6 and rel_err(layer(x).detach(), first.detach()) > 1e-3
    assert A(layer, "second").requires_grad and not A(layer).requires_grad
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="disabled"):
        layer.merge()
    layer.enable_adapters(True)
    layer.set_adapter("absent")  # a name the layer lacks: the base layer alone
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    layer.set_adapter("second")
    layer.delete_adapter("second")
    assert list(layer.lora_A) == ["default"] and layer.active_adapter is None
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        layer.update_layer("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_dense(dtype):
    torch.manual_seed(16)
    base = nn.Linear(IN, OUT).to(dtype)
    w0 = base.weight.detach().clone()
    layer = make_lora(base)
    x = torch.randn(5, IN, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    delta = (B(layer) @ A(layer)).detach() * layer.scaling["default"]
    torch.testing.assert_close(base.weight.detach().float(), (w0.float() + delta).to(dtype).float())
    y_merged = layer(x)
    bound = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(y_merged, y) < bound
    with pytest.raises(ValueError, match="merged"):
        layer.enable_adapters(False)  # the delta is in the weight: no base output to give
    with pytest.raises(ValueError, match="merged"):
        layer.set_adapter("other")
    layer.unmerge()
    assert not layer.merged
    # unmerge restores W up to the rounding of (W + d) - d in W's dtype
    eps = torch.finfo(dtype).eps
    err = (base.weight.detach().float() - w0.float()).abs()
    assert (err <= 2 * eps * (w0.float().abs() + delta.abs())).all()
    assert rel_err(layer(x), y) < bound
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_unmerge_nf4_warns_and_matches_peft():
    torch.manual_seed(17)
    dense = nn.Linear(IN, OUT)
    layer = make_lora(Linear4bit.from_linear(dense))
    with torch.no_grad():
        B(layer).normal_(0, 0.2)  # a delta about as large as W
    model, ref = peft_layer(bnb_linear4bit(dense, torch.float32), layer)
    w0 = layer.base_layer.dequantize()
    x = torch.randn(64, IN)
    y, base_only = layer(x), layer.base_layer(x)
    expect_packed, _ = reference.quantize_nf4(w0.float() + layer.get_delta_weight(), 64, double_quant=True)
    with pytest.warns(UserWarning, match="rounding"):
        layer.merge()
    # dequantize + delta + requantize: the reference quantizer's bytes
    assert torch.equal(layer.base_layer.weight, expect_packed)
    assert isinstance(layer.base_layer.quant_state, NF4State) and layer.base_layer.quant_state.nested
    merged = layer(x)
    # off by the NF4 rounding of W + delta (~9% here), far closer than the base alone (~60%)
    assert rel_err(merged, y) < 0.15 and rel_err(base_only, y) > 3 * rel_err(merged, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call_peer(ref.merge, "PEFT merge into bitsandbytes NF4")
    check_peer_bytes(ref.base_layer.weight.data, expect_packed, "PEFT merge into bitsandbytes NF4 (requantized bytes)")
    with pytest.warns(UserWarning, match="rounding"):
        layer.unmerge()
    w1 = layer.base_layer.dequantize()
    # two requantizations: back near W, not exactly (~15% here)
    assert 0 < rel_err(w1, w0) < 0.25


def test_lora_over_linear4bit_keeps_input_dtype():
    torch.manual_seed(18)
    layer = make_lora(Linear4bit.from_linear(nn.Linear(IN, OUT), compute_dtype=torch.bfloat16))
    x = torch.randn(2, IN)
    y = layer(x)
    assert y.dtype == torch.float32
    base = layer.base_layer
    expect = reference.lora_linear(x, (base.weight, base.quant_state), base.bias.detach(), A(layer), B(layer),
                                   layer.scaling["default"])
    assert rel_err(y.detach(), expect) < 2e-2  # bf16 compute


def test_lora_bad_input():
    base = nn.Linear(IN, OUT)
    with pytest.raises(TypeError, match="wraps"):
        LoraLinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="bitsandbytes.*Linear4bit"):
        LoraLinear(bnb_linear4bit(nn.Linear(IN, OUT)))
    with pytest.raises(ValueError, match="r must"):
        LoraLinear(base, r=0)
    with pytest.raises(TypeError, match="r must"):
        LoraLinear(base, r=2.0)
    with pytest.raises(TypeError, match="adapter_name must be a str"):
        LoraLinear(base, 8)  # PEFT's order: the adapter name comes second
    for name in ("", "a.b", "x/y", "..", "training", "-x"):
        with pytest.raises(ValueError, match="adapter_name"):
            LoraLinear(base, name)
    with pytest.raises(ValueError, match="lora_alpha"):
        LoraLinear(base, lora_alpha=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(base, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(base, lora_dropout=-0.1)
    with pytest.raises(NotImplementedError, match="pissa"):
        LoraLinear(base, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="init_lora_weights"):
        LoraLinear(base, init_lora_weights=1)
    layer = make_lora(base)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        layer.delete_adapter("nope")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        layer.get_delta_weight("nope")
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("default")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
