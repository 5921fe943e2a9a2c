"""Linear4bit against bitsandbytes' Linear4bit, LoraLinear against PEFT's LoRA layers.

Each comparison builds the reference from the same weights (bitsandbytes
quantizes the same dense weight: the packed bytes are asserted equal) and
copies our adapter (B random, so the LoRA path matters) into PEFT's. Dropout
is compared through its mask: our op gets an explicit seed, and PEFT's
dropout module is replaced by a multiplication with the same mask.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import llmkit.ops
from llmkit.nn import Linear4bit, LoraLinear
from llmkit.ops import NF4State, quantize_nf4
from llmkit.ops.reference import lora_dropout_keep

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

IN, OUT, R = 70, 30, 4  # odd sizes: the last NF4 block of the weight is partial


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


def peft_layer(base: nn.Module, ours: LoraLinear):
    """PEFT's LoRA layer around `base` with our adapter's settings and weights."""
    config = peft.LoraConfig(target_modules=["proj"], r=ours.r, lora_alpha=ours.lora_alpha,
                             lora_dropout=ours.lora_dropout, use_rslora=ours.use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for Conv1D
        model = peft.get_peft_model(One(base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
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
    """Make LoraLinear's op call use seed 1234 (it draws one per call otherwise)."""
    calls = []
    op = llmkit.ops.lora_linear

    def seeded(*args, **kwargs):
        calls.append(kwargs.get("training"))
        kwargs["seed"] = 1234
        return op(*args, **kwargs)

    monkeypatch.setattr(llmkit.ops, "lora_linear", seeded)
    return calls


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------- Linear4bit --


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_matches_bitsandbytes(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT).to(dtype)
    ours = Linear4bit.from_linear(dense)
    ref = bnb_linear4bit(dense, compute_dtype=dtype)
    assert ours.weight.dtype == torch.uint8 and ours.weight.shape == ((IN * OUT + 1) // 2, 1)
    assert torch.equal(ours.weight, ref.weight.data)  # byte-equal codes
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    for key in ref_sd:
        assert torch.equal(sd[key], ref_sd[key]), key
    torch.testing.assert_close(ours.dequantize(), bnb.functional.dequantize_4bit(ref.weight.data, ref.quant_state),
                               rtol=0, atol=0)
    x = torch.randn(5, 3, IN, dtype=dtype)
    y = ours(x)
    assert y.dtype == dtype and y.shape == (5, 3, OUT)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref(x), **tol)
    # and the result is the dense product with the dequantized weight, not the unquantized one
    torch.testing.assert_close(y.double(), x.double() @ ours.dequantize().double().T + dense.bias.double(), **tol)
    assert (ours.dequantize() != dense.weight).any()


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
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)

    # ours -> bitsandbytes, the way transformers loads a prequantized checkpoint
    src = Linear4bit.from_linear(nn.Linear(IN, OUT))
    sd = src.state_dict()
    target = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    target.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=target)
    target.bias = nn.Parameter(sd["bias"])
    assert torch.equal(target.weight.data, src.weight)
    torch.testing.assert_close(target(x), src(x), rtol=1e-5, atol=1e-5)


def test_linear4bit_without_double_quant_and_other_blocksize():
    torch.manual_seed(2)
    dense = nn.Linear(IN, OUT, bias=False)
    ours = Linear4bit.from_linear(dense, blocksize=128, double_quant=False)
    packed, qs = bnb.functional.quantize_4bit(dense.weight.detach(), blocksize=128, quant_type="nf4",
                                             compress_statistics=False)
    assert torch.equal(ours.weight, packed) and torch.equal(ours.quant_state.absmax, qs.absmax)
    sd = ours.state_dict()
    assert "bias" not in sd and "weight.nested_absmax" not in sd
    fresh = Linear4bit(IN, OUT, bias=False)  # blocksize 64, double quant: the checkpoint's settings win
    fresh.load_state_dict(sd)
    assert fresh.blocksize == 128 and not fresh.double_quant
    x = torch.randn(3, IN)
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)


def test_linear4bit_loads_dense_state_dict_by_quantizing():
    torch.manual_seed(3)
    dense = nn.Linear(IN, OUT)
    layer = Linear4bit(IN, OUT)
    layer.load_state_dict(dense.state_dict())
    packed, _ = quantize_nf4(dense.weight.detach(), 64, double_quant=True)
    assert torch.equal(layer.weight, packed)
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
    ref = bnb_linear4bit(dense, compute_dtype=torch.bfloat16)
    x = torch.randn(4, IN)
    y = layer(x)
    assert y.dtype == torch.float32  # back in x's dtype, as bitsandbytes
    assert rel_err(y, ref(x)) < 1e-2
    assert rel_err(y, x @ layer.dequantize().T + dense.bias) < 2e-2
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
        layer.lora_B.normal_(0, 0.5)  # PEFT's init leaves B zero: make the adapter matter
    return layer


def check_against_peft(ours: LoraLinear, peft_model, ref, x: torch.Tensor, rel: float):
    """Forward and gradients (x, A, B) of `ours` and PEFT's `ref` layer on `x`."""
    g = torch.randn(*x.shape[:-1], ours.out_features, dtype=x.dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), peft_model(x2)
    assert y1.dtype == y2.dtype == x.dtype
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert rel_err(y1, y2) < rel, rel_err(y1, y2)
    assert rel_err(x1.grad, x2.grad) < rel, rel_err(x1.grad, x2.grad)
    assert rel_err(ours.lora_A.grad, ref.lora_A["default"].weight.grad) < rel
    assert rel_err(ours.lora_B.grad, ref.lora_B["default"].weight.grad) < rel
    assert ours.base_layer.weight.grad is None
    return y1


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_dense_matches_peft(dtype, rel, rslora, fixed_seed):
    torch.manual_seed(10)
    base = nn.Linear(IN, OUT).to(dtype)
    ours = make_lora(copy.deepcopy(base), alpha=16, rslora=rslora)
    assert ours.lora_A.dtype == torch.float32  # like PEFT's autocast_adapter_dtype
    model, ref = peft_layer(base, ours)
    assert ref.scaling["default"] == ours.scaling
    x = torch.randn(3, 5, IN, dtype=dtype)
    y = check_against_peft(ours, model, ref, x, rel)
    assert fixed_seed == [True]  # one fused op call, in training mode
    # the adapter contributes (B is random): the base alone is far off
    assert rel_err(y, base(x)) > 10 * rel


def test_lora_nf4_matches_peft_over_bitsandbytes(fixed_seed):
    torch.manual_seed(11)
    dense = nn.Linear(IN, OUT)
    ours = make_lora(Linear4bit.from_linear(dense))
    bnb_base = bnb_linear4bit(dense, compute_dtype=torch.float32)
    assert torch.equal(ours.base_layer.weight, bnb_base.weight.data)
    model, ref = peft_layer(bnb_base, ours)
    assert type(ref).__name__ == "Linear4bit"  # PEFT's bitsandbytes LoRA layer
    check_against_peft(ours, model, ref, torch.randn(2, 7, IN), 1e-5)


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_dropout_matches_peft_through_the_mask(nf4, fixed_seed):
    torch.manual_seed(12)
    p = 0.3
    dense = nn.Linear(IN, OUT)
    base = Linear4bit.from_linear(dense) if nf4 else copy.deepcopy(dense)
    ours = make_lora(base, dropout=p)
    model, ref = peft_layer(bnb_linear4bit(dense, torch.float32) if nf4 else dense, ours)
    x = torch.randn(4, IN)
    keep = lora_dropout_keep(x.shape, p, 1234)
    assert 0 < keep.float().mean() < 1
    ref.lora_dropout["default"] = MaskDropout(keep, p)
    y = check_against_peft(ours, model, ref, x, 1e-5)
    # eval mode: no dropout, and a different output
    ours.eval()
    ref.lora_dropout["default"] = nn.Identity()
    model.eval()
    y_eval = ours(x)
    torch.testing.assert_close(y_eval, model(x), rtol=1e-5, atol=1e-5)
    assert rel_err(y, y_eval) > 1e-3
    assert fixed_seed[-1] is False


def test_lora_dropout_draws_fresh_masks_from_torch_generator():
    torch.manual_seed(13)
    layer = make_lora(nn.Linear(IN, OUT), dropout=0.5)
    x = torch.randn(3, IN)
    torch.manual_seed(99)
    a, b = layer(x), layer(x)
    torch.manual_seed(99)
    assert not torch.equal(a, b)  # a new mask each call
    torch.testing.assert_close(layer(x), a, rtol=0, atol=0)  # reproducible from torch's seed


def test_lora_conv1d_matches_peft(fixed_seed):
    torch.manual_seed(14)
    base = Conv1D(OUT, IN)
    with torch.no_grad():
        base.bias.normal_()
    ours = make_lora(copy.deepcopy(base))
    assert ours.fan_in_fan_out and ours.lora_A.shape == (R, IN) and ours.lora_B.shape == (OUT, R)
    model, ref = peft_layer(base, ours)
    assert ref.fan_in_fan_out
    check_against_peft(ours, model, ref, torch.randn(2, 3, IN), 1e-5)
    # merging adds the transposed delta, like PEFT's
    with torch.no_grad():
        ours.merge()
        ref.merge()
    torch.testing.assert_close(ours.base_layer.weight, ref.base_layer.weight, rtol=1e-6, atol=1e-6)


def test_lora_init_is_peft_default():
    torch.manual_seed(15)
    base = nn.Linear(IN, OUT)
    layer = LoraLinear(base, r=R, lora_alpha=4)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / IN ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)  # a fresh adapter is a no-op
    assert LoraLinear(base, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    assert LoraLinear(base, r=16, lora_alpha=8).scaling == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_dense(dtype):
    torch.manual_seed(16)
    base = nn.Linear(IN, OUT).to(dtype)
    w0 = base.weight.detach().clone()
    layer = make_lora(base)
    x = torch.randn(5, IN, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    delta = (layer.lora_B @ layer.lora_A).detach() * layer.scaling
    torch.testing.assert_close(base.weight.detach().float(), (w0.float() + delta).to(dtype).float())
    y_merged = layer(x)
    bound = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(y_merged, y) < bound
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
        layer.lora_B.normal_(0, 0.2)  # a delta about as large as W
    model, ref = peft_layer(bnb_linear4bit(dense, torch.float32), layer)
    w0 = layer.base_layer.dequantize()
    x = torch.randn(64, IN)
    y, base_only = layer(x), layer.base_layer(x)
    with pytest.warns(UserWarning, match="rounding"):
        layer.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.merge()
    # the same dequantize + delta + requantize as PEFT over bitsandbytes: the same bytes
    assert torch.equal(layer.base_layer.weight, ref.base_layer.weight.data)
    assert isinstance(layer.base_layer.quant_state, NF4State) and layer.base_layer.quant_state.nested
    merged = layer(x)
    # off by the NF4 rounding of W + delta (~9% here), far closer than the base alone (~60%)
    assert rel_err(merged, y) < 0.15 and rel_err(base_only, y) > 3 * rel_err(merged, y)
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
    w = layer.base_layer.dequantize(torch.float32)
    expect = x @ w.T + layer.base_layer.bias + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    assert rel_err(y.detach(), expect.detach()) < 2e-2


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
    with pytest.raises(ValueError, match="lora_alpha"):
        LoraLinear(base, lora_alpha=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(base, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(base, lora_dropout=-0.1)
    layer = make_lora(base)
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
