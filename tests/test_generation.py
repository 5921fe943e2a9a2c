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


# ------------------------------------------------------------------------ text prompts, argument checks

CORPUS = ["the cat sat on the mat and purred", "a dog ate the bone in the yard", "my bird sang a song at dawn"]


def test_text_prompts_continue_on_a_model_trained_with_llmkits_tokenizer(tmp_path):
    """llmkit's trained tokenizers wrap text as <s> A </s> (for encoders); a GPT trained on the
    packed `doc </s> doc </s>` stream must continue a prompt, not restart after its </s>."""
    from llmkit.data.tokenizer import train_tokenizer
    from llmkit.generation import encode_prompt

    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 20))
    tok = train_tokenizer(tmp_path / "corpus.txt", vocab_size=300, progress=False, min_frequency=1)
    assert tok.encode("the cat")[0] == tok.bos_token_id and tok.encode("the cat")[-1] == tok.eos_token_id
    assert encode_prompt(tok, "the cat") == tok.encode("the cat", add_special_tokens=False)
    stream_ids = [t for doc in CORPUS for t in tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]]
    torch.manual_seed(0)
    model = GPT.from_preset("gpt-tiny", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, block_size=64)
    data = torch.tensor(stream_ids * 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: threads only add contention on a busy machine
    try:
        for _ in range(60):  # memorises the three sentences (loss ~0.02)
            starts = torch.randint(0, len(data) - 33, (8,), generator=g)
            batch = torch.stack([data[s:s + 32] for s in starts])
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5
    out = llmkit.generate(model, ["the cat", "a dog", "my bird"], tokenizer=tok, max_new_tokens=6)
    assert len(set(out.texts)) == 3, out.texts  # the same text for every prompt: the prompt was ignored
    assert out.texts[0].startswith(" sat on the mat"), out.texts
    assert out.texts[1].startswith(" ate the bone"), out.texts
    assert out.texts[2].startswith(" sang a song"), out.texts


TRAIN_TEXT = ["the cat sat on the mat", "a dog ate the bone"] * 20


def tokenizer_dir(kind, directory):
    """tokenizer.json + tokenizer_config.json in the style of GPT-2's and Llama's hub files."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizers = pytest.importorskip("tokenizers")
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "gpt2":  # byte-level BPE, nothing added around the text
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>"}
    else:  # Llama: Metaspace BPE with byte fallback, "<s> $A" (plus " </s>" with add_eos_token)
        backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(vocab_size=300,
                                                                     special_tokens=["<unk>", "<s>", "</s>"]))
        single = "<s> $A </s>" if kind == "llama-eos" else "<s> $A"
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "add_bos_token": True, "add_eos_token": kind == "llama-eos"}
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(__import__("json").dumps(config))
    return directory


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-eos"])
def test_prompt_ids_equal_transformers_tokenizer(kind, tmp_path):
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.generation import encode_prompt

    directory = tokenizer_dir(kind, tmp_path)
    ours = Tokenizer.from_file(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    model = GPT.from_preset("gpt-tiny", vocab_size=len(ours))
    for text in ["the cat sat", "a dog ate the bone", "the mat ate a cat"]:  # letters the tiny vocab knows
        reference = theirs(text)["input_ids"]
        if kind == "llama-eos":  # transformers appends </s>; generation never does
            assert reference[-1] == 2
            reference = reference[:-1]
        if kind != "gpt2":
            assert reference[0] == 1  # the BOS the template asks for
        assert encode_prompt(ours, text) == reference
        assert encode_prompt(theirs, text) == reference
        out = llmkit.generate(model, text, tokenizer=ours, max_new_tokens=0)
        assert out.prompt_lengths == [len(reference)] and out.sequences == [[]]


def test_encoder_templates_add_nothing_to_prompts():
    tokenizers = pytest.importorskip("tokenizers")
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.generation import encode_prompt

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "cat": 5}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = Tokenizer(backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    assert tok.encode("the cat") == [2, 4, 5, 3] and encode_prompt(tok, "the cat") == [4, 5]


def test_sampling_arguments_are_checked_at_the_call():
    ours = GPT.from_preset("gpt-tiny")
    bad = [
        (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty must be finite"),
        (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty must be finite"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(temperature=float("inf"), do_sample=True), ValueError, "temperature must be finite"),
        (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
        (dict(top_p=float("nan")), ValueError, "top_p must be finite"),
        (dict(top_p=0.0), ValueError, "top_p must be in"),
        (dict(top_p=1.5), ValueError, "top_p must be in"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(top_k=True), TypeError, "top_k must be an int"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
        (dict(max_new_tokens=3.0), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=None), TypeError, "max_new_tokens must be an int"),
        (dict(do_sample="yes"), TypeError, "do_sample must be True or False"),
        (dict(seed="1"), TypeError, "seed must be an int"),
        (dict(repetition_penalty="2"), TypeError, "repetition_penalty must be a number"),
    ]
    for kwargs, error, match in bad:
        for call in (llmkit.generate, llmkit.stream):
            with pytest.raises(error, match=match):
                call(ours, [[1, 2]], **kwargs)
    with pytest.raises(ValueError, match="attention_mask goes with a .* prompt tensor"):
        llmkit.generate(ours, [[1, 2]], attention_mask=torch.ones(1, 2))
    with pytest.raises(TypeError, match="integer token ids"):
        llmkit.generate(ours, torch.ones(1, 3))
    with pytest.raises(ValueError, match="no prompts"):
        llmkit.generate(ours, torch.zeros(0, 3, dtype=torch.long))
    out = llmkit.generate(ours, [[1, 2], [3]], max_new_tokens=0)
    assert out.sequences == [[], []] and out.new_tokens == 0 and out.prompt_lengths == [2, 1]
    # Greedy decoding ignores temperature: 0 is accepted there (OpenAI-style "temperature 0").
    assert len(llmkit.generate(ours, [[1, 2]], max_new_tokens=2, temperature=0.0, eos_token_id=[]).sequences[0]) == 2
