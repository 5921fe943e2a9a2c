"""llmkit.generate: cached decoding against transformers' generate."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkit  # noqa: E402
from llmkit.models import GPT  # noqa: E402

from test_models_gpt import VOCAB, hf_model  # noqa: E402


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30] * 12, [3]]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_greedy_equals_transformers_token_for_token(kind):
    hf = hf_model(kind)
    ours = GPT.from_hf(hf)
    ids, mask = left_padded(PROMPTS)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    out = llmkit.generate(ours, PROMPTS, max_new_tokens=24, eos_token_id=[])
    for i in range(len(PROMPTS)):
        assert out.sequences[i] == ref[i, ids.shape[1]:].tolist()
    assert out.finish_reasons == ["length"] * 4 and out.new_tokens == 96 and out.tokens_per_second > 0
    # The same prompts given as a left-padded tensor.
    again = llmkit.generate(ours, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert again.sequences == out.sequences


def test_repetition_penalty_equals_transformers():
    hf = hf_model("gpt2")
    ours = GPT.from_hf(hf)
    prompt = torch.tensor([[7, 8, 9, 7, 8]])
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                      repetition_penalty=1.7, eos_token_id=None, pad_token_id=0)
    out = llmkit.generate(ours, prompt, max_new_tokens=20, repetition_penalty=1.7, eos_token_id=[])
    assert out.sequences[0] == ref[0, 5:].tolist()


def test_eos_stops_each_sequence_on_its_own():
    ours = GPT.from_hf(hf_model("gpt2"))
    free = llmkit.generate(ours, PROMPTS, max_new_tokens=12, eos_token_id=[])
    stop_token = free.sequences[0][4]  # appears in sequence 0 at position 4 at the latest
    out = llmkit.generate(ours, PROMPTS, max_new_tokens=12, eos_token_id=stop_token)
    assert out.finish_reasons[0] == "eos"
    for i in range(4):
        seq = free.sequences[i]
        cut = seq.index(stop_token) + 1 if stop_token in seq else len(seq)
        assert out.sequences[i] == seq[:cut]
        assert out.finish_reasons[i] == ("eos" if stop_token in seq else "length")


def test_sampling_options():
    ours = GPT.from_hf(hf_model("llama"))
    greedy = llmkit.generate(ours, PROMPTS, max_new_tokens=10, eos_token_id=[])
    # top_k=1 and a tiny top_p both leave only the argmax.
    assert llmkit.generate(ours, PROMPTS, max_new_tokens=10, do_sample=True, top_k=1, seed=3,
                           eos_token_id=[]).sequences == greedy.sequences
    assert llmkit.generate(ours, PROMPTS, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=3,
                           eos_token_id=[]).sequences == greedy.sequences
    a = llmkit.generate(ours, PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=11, eos_token_id=[])
    b = llmkit.generate(ours, PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=11, eos_token_id=[])
    c = llmkit.generate(ours, PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=12, eos_token_id=[])
    assert a.sequences == b.sequences and a.sequences != c.sequences
    # top_k=3: every sampled token is among the 3 most likely after its prefix.
    out = llmkit.generate(ours, [PROMPTS[0]], max_new_tokens=8, do_sample=True, top_k=3, temperature=5.0, seed=0,
                          eos_token_id=[])
    seq = PROMPTS[0] + out.sequences[0]
    with torch.no_grad():
        logits = ours(torch.tensor([seq])).logits[0]
    for t in range(len(PROMPTS[0]), len(seq)):
        assert seq[t] in logits[t - 1].topk(3).indices.tolist()


def test_stream_yields_generate_tokens_and_text():
    tokenizers = pytest.importorskip("tokenizers")
    from llmkit.data.tokenizer import Tokenizer

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = Tokenizer(backend, eos_token="w2", unk_token="w0")
    ours = GPT.from_hf(hf_model("gpt2"))
    out = llmkit.generate(ours, ["w5 w6 w7", "w9"], tokenizer=tok, max_new_tokens=9, eos_token_id=[])
    events = list(llmkit.stream(ours, ["w5 w6 w7", "w9"], tokenizer=tok, max_new_tokens=9, eos_token_id=[]))
    for i in range(2):
        assert [e.token_id for e in events if e.index == i] == out.sequences[i]
        assert "".join(e.text for e in events if e.index == i) == out.texts[i] == tok.decode(out.sequences[i])
    # Stop strings end a sequence once its text contains one, and cut the text after it.
    stop = out.texts[0].split()[2] + " "
    cut = llmkit.generate(ours, ["w5 w6 w7"], tokenizer=tok, max_new_tokens=9, stop_strings=[stop], eos_token_id=[])
    assert cut.finish_reasons == ["stop_string"] and cut.texts[0].endswith(stop)
    first = next(n for n in range(1, 10) if stop in tok.decode(out.sequences[0][:n]))
    assert cut.sequences[0] == out.sequences[0][:first]


def test_generate_bad_input():
    ours = GPT.from_preset("gpt-tiny")
    with pytest.raises(ValueError, match="empty prompt"):
        llmkit.generate(ours, [[1, 2], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llmkit.generate(ours, [[1, 512]])
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        llmkit.generate(ours, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="need a tokenizer"):
        llmkit.generate(ours, "hello")
    with pytest.raises(ValueError, match="temperature"):
        llmkit.generate(ours, [[1]], do_sample=True, temperature=0)
    with pytest.raises(TypeError, match="llmkit.models.GPT"):
        llmkit.generate(torch.nn.Linear(2, 2), [[1]])
    with pytest.raises(ValueError, match="empty prompt"):
        llmkit.stream(ours, [[]])  # raised by the call, before any iteration
    out = llmkit.generate(ours, [[1, 2]], max_new_tokens=3, eos_token_id=[], progress=True)
    assert len(out.sequences[0]) == 3
