"""llmkit.nn.sdpa vs torch's scaled_dot_product_attention, llmkit.nn.Attention
and RoPE vs transformers' Llama, and attn_implementation="llmkit" vs "sdpa" on
tiny transformers models (same weights, logits and gradients compared).

Paths that must run on the kernel are checked with warnings turned into
errors: a silent fallback to torch would otherwise pass every comparison.
"""

import contextlib
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import llmkit  # noqa: F401
from llmkit.nn import Attention, RotaryEmbedding, apply_rotary, functional, sdpa

transformers = pytest.importorskip("transformers")
from llmkit.integrations import transformers as llmkit_hf  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fresh_fallback_warnings():
    """Each test sees the once-per-reason fallback warnings anew."""
    functional._warned_fallback_reasons.clear()
    yield
    functional._warned_fallback_reasons.clear()


@contextlib.contextmanager
def no_fallback():
    """Context in which a fallback warning fails the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="llmkit attention falls back")
        yield


def rand(*shape, device="cpu", dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)


def assert_close(actual, expected, dtype=torch.float32):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------ sdpa ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlens", [(16, 16), (5, 19), (19, 5), (1, 9)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(device, dtype, seqlens, is_causal):
    sq, sk = seqlens
    q, k, v = (rand(2, 4, s, 32, device=device, dtype=dtype, seed=i) for i, s in enumerate((sq, sk, sk)))
    with no_fallback():
        out = sdpa(q, k, v, is_causal=is_causal)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype)


def test_sdpa_scale_gqa_and_gradients(device):
    q = rand(2, 6, 11, 64, device=device, seed=1, requires_grad=True)
    k = rand(2, 2, 13, 64, device=device, seed=2, requires_grad=True)
    v = rand(2, 2, 13, 64, device=device, seed=3, requires_grad=True)
    grad_out = rand(2, 6, 11, 64, device=device, seed=4)
    with no_fallback():
        out = sdpa(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e)


@pytest.mark.parametrize("shape", [(3, 10, 16), (10, 16), (2, 3, 2, 10, 16)])
def test_sdpa_other_leading_dims(device, shape):
    q, k, v = (rand(*shape, device=device, seed=i) for i in range(3))
    with no_fallback():
        out = sdpa(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == expected.shape
    assert_close(out, expected)


def test_sdpa_mismatched_heads_need_enable_gqa(device):
    q, k = rand(1, 4, 5, 16, device=device), rand(1, 2, 5, 16, device=device)
    with pytest.raises(RuntimeError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdpa(q, k, k)


def padding_mask(lengths, seqlen, left: bool, device):
    idx = torch.arange(seqlen, device=device)
    lengths = torch.tensor(lengths, device=device)[:, None]
    return idx >= seqlen - lengths if left else idx < lengths


@pytest.mark.parametrize("left", [False, True])
def test_sdpa_padding_masks_run_on_the_kernel(device, left):
    q, k, v = (rand(3, 2, 12, 16, device=device, seed=i, requires_grad=True) for i in range(3))
    keys = padding_mask([12, 7, 0], 12, left, device)  # one row without any key
    masks = {
        "key padding": keys[:, None, None, :],
        "causal + left padding": keys[:, None, None, :] & torch.ones(12, 12, dtype=torch.bool, device=device).tril(),
        "float 0/-inf": torch.zeros(3, 1, 1, 12, device=device).masked_fill(~keys[:, None, None, :], float("-inf")),
    }
    if not left:
        del masks["causal + left padding"]  # right padding + causal is not a kernel pattern (falls back)
    for name, mask in masks.items():
        with no_fallback():
            out = sdpa(q, k, v, attn_mask=mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert_close(out, expected), name
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
        for g, e in zip(grads, expected_grads):
            assert_close(g, e)


def test_sdpa_fallback_warns_once_and_matches_torch(device):
    q, k, v = (rand(2, 2, 9, 16, device=device, seed=i) for i in range(3))
    scattered = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)).to(device) > 0.5
    with pytest.warns(UserWarning, match="falls back.*attn_mask"):
        out = sdpa(q, k, v, attn_mask=scattered)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=scattered))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdpa(q, k, v, attn_mask=scattered)  # same reason: no second warning

    odd_head_dim = [rand(2, 2, 9, 12, device=device, seed=i) for i in range(3)]
    with pytest.warns(UserWarning, match="head_dim 12"):
        out = sdpa(*odd_head_dim, is_causal=True)
    assert_close(out, F.scaled_dot_product_attention(*odd_head_dim, is_causal=True))


# ------------------------------------------------------ RoPE, Attention ----

def hf_llama_config(**overrides):
    config = dict(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attention_dropout=0.0, rope_theta=10000.0)
    config.update(overrides)
    return transformers.LlamaConfig(**config)


def test_rope_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = hf_llama_config()
    head_dim = config.hidden_size // config.num_attention_heads
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 9, 11, 40, 41, 42]])
    q, k = rand(2, 6, 4, head_dim, seed=1), rand(2, 6, 2, head_dim, seed=2)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
    cos, sin = RotaryEmbedding(head_dim, base=10000.0)(position_ids)
    assert_close(apply_rotary(q, cos, sin), q_hf.transpose(1, 2))
    assert_close(apply_rotary(k, cos, sin), k_hf.transpose(1, 2))


def test_attention_matches_llama_attention(device):
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = hf_llama_config()
    config._attn_implementation = "sdpa"
    hf = LlamaAttention(config, layer_idx=0).to(device)
    ours = Attention(128, num_heads=4, num_kv_heads=2, causal=True, rope=True, rope_base=10000.0).to(device)
    ours.load_state_dict(hf.state_dict())
    x = rand(2, 10, 128, device=device, seed=3)
    position_ids = torch.arange(10, device=device)[None].expand(2, -1)
    cos_sin = LlamaRotaryEmbedding(config).to(device)(x, position_ids)
    expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=None)
    out = ours(x, position_ids=position_ids)
    assert_close(out, expected)
    grad_out = rand(2, 10, 128, device=device, seed=4)
    grads = torch.autograd.grad(out, list(ours.parameters()), grad_out)
    expected_grads = torch.autograd.grad(expected, list(hf.parameters()), grad_out)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e)


def test_attention_window_and_cross_attention(device):
    attn = Attention(64, num_heads=4, num_kv_heads=1, causal=True, window=(3, 0)).to(device)
    x = rand(2, 9, 64, device=device, seed=1, requires_grad=True)
    out = attn(x)
    # The same layer through torch: mask j in [i - 3, i].
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    mask = ((j <= i) & (j >= i - 3)).to(device)
    q = attn.q_proj(x).view(2, 9, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(2, 9, 1, 16).transpose(1, 2)
    v = attn.v_proj(x).view(2, 9, 1, 16).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, attn.o_proj(expected.transpose(1, 2).reshape(2, 9, 64)))
    out.sum().backward()
    assert x.grad.shape == x.shape

    cross = Attention(64, num_heads=2).to(device)
    context = rand(2, 5, 64, device=device, seed=2)
    assert cross(x, context=context).shape == (2, 9, 64)
    with pytest.raises(ValueError, match="divisible"):
        Attention(64, num_heads=4, num_kv_heads=3)


# ------------------------------------------------------------ transformers ----

def tiny_configs():
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": transformers.LlamaConfig(**common),
        "mistral-sliding": transformers.MistralConfig(**common, sliding_window=5),
        "gpt2": transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                        bos_token_id=0, eos_token_id=0),
    }


def model_pair(config, device, build=transformers.AutoModelForCausalLM.from_config):
    """The same random weights under attn_implementation "sdpa" and "llmkit"."""
    torch.manual_seed(0)
    ref = build(copy.deepcopy(config), attn_implementation="sdpa").to(device).eval()
    ours = build(copy.deepcopy(config), attn_implementation="llmkit").to(device).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "llmkit" and ref.config._attn_implementation == "sdpa"
    return ref, ours


def batch(device, padding):
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(3, 12, dtype=torch.long, device=device)
    if padding == "left":
        mask[1, :5] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, 7:] = 0
        mask[2, 11:] = 0
    return ids, (None if padding is None else mask)


# Mistral with sliding_window 5 < 12 tokens gets a mask even without padding; Llama without
# padding runs mask-free (test_set_attn_implementation_and_mask_fallback).
@pytest.mark.parametrize("name, padding", [("llama", "left"), ("llama", "right"), ("mistral-sliding", None),
                                           ("mistral-sliding", "left"), ("mistral-sliding", "right"),
                                           ("gpt2", "right")])
def test_causal_lm_logits_and_gradients_match_sdpa(device, name, padding):
    ref, ours = model_pair(tiny_configs()[name], device)
    ids, mask = batch(device, padding)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with no_fallback():
        logits = ours(ids, attention_mask=mask).logits
    expected = ref(ids, attention_mask=mask).logits
    assert_close(logits[valid], expected[valid])

    labels = ids.masked_fill(~valid, -100)
    with no_fallback():
        ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    for (param_name, p), e in zip(ours.named_parameters(), ref.parameters()):
        if e.grad is not None:
            assert_close(p.grad, e.grad), param_name


@pytest.mark.parametrize("padding", [None, "right"])
def test_bert_encoder_matches_sdpa(device, padding):
    config = transformers.BertConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, attention_probs_dropout_prob=0.0)
    ref, ours = model_pair(config, device, build=transformers.BertModel._from_config)
    ids, mask = batch(device, padding)
    with no_fallback():
        hidden = ours(ids, attention_mask=mask).last_hidden_state
    # Bidirectional padding keeps every query row, so even padded positions match.
    assert_close(hidden, ref(ids, attention_mask=mask).last_hidden_state)


def test_generate_with_left_padding_matches_sdpa(device):
    ref, ours = model_pair(tiny_configs()["mistral-sliding"], device)
    ids, mask = batch(device, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with no_fallback():
        generated = ours.generate(ids, **kwargs)
    assert torch.equal(generated, ref.generate(ids, **kwargs))


def test_set_attn_implementation_and_mask_fallback(device):
    ref, _ = model_pair(tiny_configs()["llama"], device)
    model = copy.deepcopy(ref)
    model.set_attn_implementation("llmkit")
    assert model.config._attn_implementation == "llmkit"
    ids, _ = batch(device, None)
    with no_fallback():
        assert_close(model(ids).logits, ref(ids).logits)
    # A custom 4-D mask (here: keys 3..5 hidden) is passed through as is and falls back to sdpa.
    custom = torch.ones(12, 12, dtype=torch.bool, device=device).tril()
    custom[:, 3:6] = False
    custom[:3, :] = torch.ones(3, 12, dtype=torch.bool, device=device).tril()[:3]
    custom = custom[None, None].expand(3, 1, 12, 12)
    with pytest.warns(UserWarning, match="falls back to transformers' sdpa"):
        logits = model(ids, attention_mask=custom).logits
    assert_close(logits, ref(ids, attention_mask=custom).logits)


def test_register_is_idempotent_and_named():
    llmkit_hf.register()
    llmkit_hf.register()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["llmkit"] is llmkit_hf.llmkit_attention_forward
    assert "llmkit" in AttentionMaskInterface._global_mapping


def test_import_llmkit_leaves_transformers_alone():
    """import llmkit must not import transformers (slow); once it is imported, registration works."""
    code = ("import sys, llmkit; assert 'transformers' not in sys.modules, 'import llmkit imported transformers'; "
            "import transformers; llmkit.integrations.register_available(); "
            "from transformers import AttentionInterface; assert 'llmkit' in AttentionInterface._global_mapping")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_llmkit_sdpa_is_the_drop_in():
    """The issue's entry point: llmkit.sdpa(q, k, v, ...) with torch's layout."""
    import llmkit

    q, k, v = (torch.randn(2, 4, 33, 64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(llmkit.sdpa(q, k, v, is_causal=True), expected, rtol=1e-5, atol=1e-5)


def test_kernel_calls_counts_only_kernel_runs():
    from llmkit.integrations import transformers as llmkit_hf

    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, n_positions=64, vocab_size=100)
    ref, ours = model_pair(config, "cpu")
    before = llmkit_hf.kernel_calls()
    with torch.no_grad():
        ref(torch.randint(0, 100, (1, 16)))
    assert llmkit_hf.kernel_calls() == before  # the SDPA twin does not touch our kernel
    with torch.no_grad():
        ours(torch.randint(0, 100, (1, 16)))
    assert llmkit_hf.kernel_calls() == before + 2  # one call per layer


@pytest.mark.parametrize("kwargs,match", [
    ({"embed_dim": 64, "num_heads": 4, "num_kv_heads": 3}, "divisible"),
    ({"embed_dim": 64, "num_heads": 0}, ">= 1"),
    ({"embed_dim": 72, "num_heads": 2}, "multiple of 8"),  # head_dim 36
    ({"embed_dim": 64, "num_heads": 1, "head_dim": 512}, "up to 256"),
])
def test_attention_module_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        llmkit.nn.Attention(**kwargs)


def test_without_transformers_the_integration_names_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"  # as if it were not installed
            "import llmkit\n"
            "try:\n"
            "    import llmkit.integrations.transformers\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install 'llmkit[hf]'" in result.stdout
