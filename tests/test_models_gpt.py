"""GPT (GPT-2 and Llama-style) against transformers' own models, built from
configs with random weights (nothing is downloaded)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.models import GPT, GPTConfig, KVCache  # noqa: E402
from llmkit.models.gpt import GPT_PRESETS  # noqa: E402

VOCAB = 211


def hf_model(kind: str, **overrides):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_positions=96, n_layer=2, n_head=4, n_embd=64, **common, **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "gpt2-untied":
        cfg = transformers.GPT2Config(n_positions=96, n_layer=2, n_head=2, n_embd=48, n_inner=72,
                                      tie_word_embeddings=False, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, rope_theta=500.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama-tied":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=128, tie_word_embeddings=True, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=128, sliding_window=9, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # livelier logits than the tiny init (no near-ties in argmax tests)
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


KINDS = ["gpt2", "gpt2-untied", "llama", "llama-tied", "mistral", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_loss_match_transformers(kind):
    hf = hf_model(kind)
    ours = GPT.from_hf(hf).eval()
    ids = torch.randint(0, VOCAB, (3, 29))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = ours(ids, labels=ids)
    assert rel_err(out.logits, ref.logits) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4 * ref.loss.item()


def test_gradients_match_transformers():
    hf = hf_model("gpt2")  # eval(): HF's GPT-2 dropout off, gradients still flow
    ours = GPT.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 23))
    hf(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    pairs = {"transformer.wte.weight": hf_params["transformer.wte.weight"].grad,
             "transformer.wpe.weight": hf_params["transformer.wpe.weight"].grad,
             "transformer.h.0.attn.c_attn.weight": hf_params["transformer.h.0.attn.c_attn.weight"].grad.t(),
             "transformer.h.1.mlp.c_fc.bias": hf_params["transformer.h.1.mlp.c_fc.bias"].grad,
             "transformer.ln_f.weight": hf_params["transformer.ln_f.weight"].grad}
    ours_params = dict(ours.named_parameters())
    for name, ref in pairs.items():
        grad = ours_params[name].grad
        assert torch.isfinite(grad).all(), name
        assert rel_err(grad, ref) < 1e-3, name


def test_llama_gradients_match_transformers():
    hf = hf_model("llama")
    ours = GPT.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 19))
    hf(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    q_grad = dict(ours.named_parameters())["transformer.h.0.attn.c_attn.weight"].grad[:64]
    assert rel_err(q_grad, hf.model.layers[0].self_attn.q_proj.weight.grad) < 1e-3
    gate = dict(ours.named_parameters())["transformer.h.1.mlp.c_fc.weight"].grad[:88]
    assert rel_err(gate, hf.model.layers[1].mlp.gate_proj.weight.grad) < 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_packed_and_single_sequences_agree(kind):
    ours = GPT.from_hf(hf_model(kind)).eval()
    lengths = [17, 5, 11]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    with torch.no_grad():
        singles = [ours(s[None]).logits[0] for s in seqs]
        packed = ours(torch.cat(seqs), cu_seqlens=torch.tensor([0, 17, 22, 33], dtype=torch.int32)).logits
        ids = torch.zeros(3, 17, dtype=torch.long)
        mask = torch.zeros(3, 17, dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding for one row, right padding for the others
            span = slice(17 - len(s), 17) if i == 1 else slice(0, len(s))
            ids[i, span], mask[i, span] = s, 1
        padded = ours(ids, attention_mask=mask).logits
    start = 0
    for i, (s, single) in enumerate(zip(seqs, singles)):
        assert rel_err(packed[start:start + len(s)], single) < 1e-5
        assert rel_err(padded[i][mask[i].bool()], single) < 1e-5
        start += len(s)
    assert (padded[1, :12] == 0).all()


def test_packed_loss_does_not_cross_sequences():
    ours = GPT.from_hf(hf_model("gpt2")).eval()
    a, b = torch.randint(0, VOCAB, (9,)), torch.randint(0, VOCAB, (14,))
    with torch.no_grad():
        packed = ours(torch.cat([a, b]), labels=torch.cat([a, b]),
                      cu_seqlens=torch.tensor([0, 9, 23], dtype=torch.int32)).loss
        la = ours(a[None], labels=a[None]).loss
        lb = ours(b[None], labels=b[None]).loss
    assert abs(packed.item() - (8 * la.item() + 13 * lb.item()) / 21) < 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "mistral"])
def test_kv_cache_steps_equal_full_forward(kind):
    ours = GPT.from_hf(hf_model(kind)).eval()
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (13, 4)]
    cache = KVCache(ours.config, batch=2, max_len=20)
    with torch.no_grad():
        full = [ours(s[None]).logits[0] for s in seqs]
        prompt = [s[:-3] for s in seqs]
        out = ours(torch.cat(prompt), cu_seqlens=torch.tensor([0, 10, 11], dtype=torch.int32), kv_cache=cache,
                   logits_to_keep="last").logits
        assert rel_err(out[0], full[0][9]) < 1e-5 and rel_err(out[1], full[1][0]) < 1e-5
        for step in range(3):
            out = ours(torch.stack([s[-3 + step] for s in seqs]), cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32),
                       kv_cache=cache, logits_to_keep="last").logits
            for b, s in enumerate(seqs):
                assert rel_err(out[b], full[b][len(s) - 3 + step]) < 1e-5
        # A finished sequence drops out: only sequence 1 advances.
        out = ours(torch.tensor([5]), cu_seqlens=torch.tensor([0, 0, 1], dtype=torch.int32), kv_cache=cache,
                   logits_to_keep="last").logits
        ref = ours(torch.cat([seqs[1], torch.tensor([5])])[None]).logits[0, -1]
        assert out.shape == (1, VOCAB) and rel_err(out[0], ref) < 1e-5
    assert cache.lengths == [13, 5]
    with pytest.raises(ValueError, match="for inference"):
        ours(torch.arange(2), labels=torch.arange(2), cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32),
             kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 20"):
        ours(torch.arange(16), cu_seqlens=torch.tensor([0, 8, 16], dtype=torch.int32), kv_cache=cache)


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama", "llama-tied", "mistral", "qwen2"])
def test_to_hf_round_trip(tmp_path, kind):
    hf = hf_model(kind)
    ours = GPT.from_hf(hf)
    ours.to_hf(tmp_path / "ckpt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(hf)
    again = GPT.from_hf(tmp_path / "ckpt").eval()
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(loaded(ids).logits, ref) < 1e-5
        assert rel_err(again(ids).logits, ref) < 1e-4


def test_trained_gpt_saves_and_loads_bitwise(tmp_path):
    model = GPT.from_preset("gpt-tiny")
    model.to_hf(tmp_path)
    again = GPT.from_hf(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("*.tmp"))


def test_presets_and_parameter_counts():
    assert GPT(GPTConfig.preset("gpt2")).num_parameters() == 124_439_808  # GPT-2 small, tied embeddings
    tiny = GPT.from_preset("gpt-tiny")
    assert tiny.num_parameters() == sum(p.numel() for p in tiny.parameters())
    assert "# parameters" in repr(tiny)
    assert set(GPT_PRESETS) >= {"gpt-tiny", "gpt-6l-384", "gpt2", "llama-tiny"}
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.preset("gpt-5")


def test_llama_preset_trains():
    model = GPT.from_preset("llama-tiny")
    ids = torch.randint(0, 512, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_bad_input_raises():
    model = GPT.from_preset("gpt-tiny")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="must match input_ids"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
        GPTConfig(n_embd=60, n_head=6)
    mixed = GPT(GPTConfig.preset("gpt-tiny", position="rope"))
    with pytest.raises(ValueError, match="no transformers architecture"):
        mixed.to_hf("/nonexistent/never-written")


def test_from_hf_refuses_other_models(tmp_path):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        GPT.from_hf(transformers.BertModel(cfg))
    with pytest.raises(FileNotFoundError):
        GPT.from_hf(tmp_path / "missing")
