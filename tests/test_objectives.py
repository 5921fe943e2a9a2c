"""llmkit.objectives: packing, MLM / NSP / CLM / span-corruption statistics and losses.

Statistical checks use fixed seeds and a large batch (64 x 512 tokens) and
allow 3 standard errors around the reference rates (BERT / RoBERTa / T5).
"""

import itertools
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from llmkit.data import english_corpus_lines
from llmkit.data.shards import TokenShards
from llmkit.data.tokenizer import Tokenizer
from llmkit.objectives import (IGNORE_INDEX, LossTerm, ObjectiveModule, PackedBlocks, get_objective,
                               input_and_target_lengths, random_spans_noise_mask, reconstruct)
from llmkit.objectives.span import noise_counts

N_SENTINELS = 100


def within_3se(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= 3 * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------- fixtures --

@pytest.fixture(scope="module")
def paragraphs():
    """Documents: the first paragraphs of the shipped corpus (blank-line separated)."""
    lines = list(itertools.islice(english_corpus_lines(), 7000))
    docs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            docs.append(" ".join(current))
            current = []
    return docs


@pytest.fixture(scope="module")
def wordpiece(paragraphs):
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(paragraphs, trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    return Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                     mask_token="[MASK]")


@pytest.fixture(scope="module")
def bpe(paragraphs):
    """Byte-level BPE with RoBERTa's roles and T5's sentinels (added special tokens)."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + [f"<extra_id_{i}>" for i in range(N_SENTINELS)]
    backend.train_from_iterator(paragraphs, trainers.BpeTrainer(
        vocab_size=900, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Tokenizer(backend, bos_token="<s>", cls_token="<s>", pad_token="<pad>", eos_token="</s>",
                     sep_token="</s>", unk_token="<unk>", mask_token="<mask>")


def shards_for(tokenizer, paragraphs) -> TokenShards:
    docs = tokenizer.encode_batch(paragraphs, add_special_tokens=False)
    return TokenShards.from_documents(docs, tokenizer.vocab_size)


@pytest.fixture(scope="module")
def wp_shards(wordpiece, paragraphs):
    return shards_for(wordpiece, paragraphs)


@pytest.fixture(scope="module")
def bpe_shards(bpe, paragraphs):
    return shards_for(bpe, paragraphs)


def naive_stream(shards, separator):
    out = []
    for i in range(shards.n_docs):
        out.extend(shards.document(i).tolist())
        out.append(separator)
    return np.array(out, dtype=np.int64)


def batch_of(objective, examples, ids, epoch=0):
    return objective.collate([examples[i] for i in ids], ids, epoch)


# --------------------------------------------------------------- blocks --

@pytest.mark.parametrize("block_len,prefix,suffix", [(7, (), ()), (16, (900,), (901,)), (5, (900, 902), (901,)),
                                                     (1, (), ())])
def test_packed_blocks_match_naive_stream(block_len, prefix, suffix):
    rng = np.random.default_rng(0)
    lengths = [0, 3, 1, 40, 0, 0, 17, 2, 9, 25, 1]
    docs = [rng.integers(0, 800, n).tolist() for n in lengths]
    shards = TokenShards.from_documents(docs, 1000)
    blocks = PackedBlocks(shards, block_len, 999, prefix=prefix, suffix=suffix)
    stream = naive_stream(shards, 999)
    n = block_len - len(prefix) - len(suffix)
    assert len(blocks) == len(stream) // n
    for i in range(len(blocks)):
        expected = np.concatenate([prefix, stream[i * n:(i + 1) * n], suffix]).astype(np.int64)
        np.testing.assert_array_equal(blocks[i], expected)
        assert blocks[i].dtype == np.int64
    np.testing.assert_array_equal(blocks[-1], blocks[len(blocks) - 1])
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    assert list(map(len, blocks)) == [block_len] * len(blocks)  # iteration stops at the end


def test_packed_blocks_bad_arguments():
    shards = TokenShards.from_documents([[1, 2, 3]], 10)
    with pytest.raises(ValueError, match="no room"):
        PackedBlocks(shards, 2, 0, prefix=[5], suffix=[6])
    with pytest.raises(ValueError, match="separator_id"):
        PackedBlocks(shards, 4, None)


# ------------------------------------------------------------------ CLM --

def test_clm_blocks_cross_documents_with_eos(bpe, bpe_shards):
    clm = get_objective("clm", bpe)
    assert (clm.name, clm.model_family) == ("clm", "gpt")
    examples = clm.examples(bpe_shards, 128)
    stream = naive_stream(bpe_shards, bpe.eos_token_id)
    assert len(examples) == len(stream) // 128
    crossing = 0
    for i in range(0, len(examples), 7):
        np.testing.assert_array_equal(examples[i], stream[i * 128:(i + 1) * 128])
        crossing += int((examples[i][:-1] == bpe.eos_token_id).any())
    assert crossing > 0  # blocks run across documents, EOS in between
    batch = batch_of(clm, examples, [3, 1, 4])
    assert batch["input_ids"].shape == (3, 128) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert clm.target_counts(batch) == {"clm": 3 * 127}


def test_clm_needs_eos(wordpiece, wp_shards):
    with pytest.raises(ValueError, match="eos_token"):
        get_objective("clm", wordpiece)


# ------------------------------------------------------------------ MLM --

def mlm_branches(tokenizer, batch, originals):
    """Selected / [MASK] / random / unchanged counts, from the labels and the originals."""
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    selected = labels != IGNORE_INDEX
    masked = selected & (inputs == tokenizer.mask_token_id)
    unchanged = selected & (inputs == originals)
    random = selected & ~masked & ~unchanged
    return selected, masked, random, unchanged


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_statistics(wordpiece, wp_shards, whole_word):
    mlm = get_objective("mlm", wordpiece, whole_word=whole_word, seed=3)
    assert (mlm.name, mlm.model_family) == ("mlm", "bert")
    examples = mlm.examples(wp_shards, 512)
    assert len(examples) >= 64
    ids = list(range(64))
    originals = np.stack([examples[i] for i in ids])
    assert (originals[:, 0] == wordpiece.cls_token_id).all() and (originals[:, -1] == wordpiece.sep_token_id).all()
    batch = mlm.collate([examples[i] for i in ids], ids, epoch=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (64, 512) and bool((batch["attention_mask"] == 1).all())
    selected, masked, random, unchanged = mlm_branches(wordpiece, batch, originals)
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()

    special = np.isin(originals, wordpiece.all_special_ids)
    assert special.sum() >= 2 * 64  # [CLS], [SEP] (and document separators)
    assert not (selected & special).any()  # no special token ever selected
    np.testing.assert_array_equal(inputs[special], originals[special])
    # Labels: the original at selected positions, -100 (and an untouched input) elsewhere.
    np.testing.assert_array_equal(labels[selected], originals[selected])
    np.testing.assert_array_equal(inputs[~selected], originals[~selected])
    assert mlm.target_counts(batch) == {"mlm": int(selected.sum())}

    n_candidates = int((~special).sum())
    rate = selected.sum() / n_candidates
    if whole_word:
        # One Bernoulli draw per word: var(rate) = p (1 - p) sum(len_w^2) / (sum len_w)^2.
        lengths = np.array([len(g) for row in originals for g in word_groups(wordpiece, row)])
        assert lengths.sum() == n_candidates and lengths.max() > 1
        assert abs(rate - 0.15) <= 3 * math.sqrt(0.15 * 0.85 * (lengths ** 2).sum()) / n_candidates, rate
    else:
        assert within_3se(rate, 0.15, n_candidates), rate
    n_sel = int(selected.sum())
    # A random replacement equal to the original reads as "unchanged": 0.1 / |non-special| of them.
    n_replacements = wordpiece.vocab_size - len(wordpiece.all_special_ids)
    assert within_3se(masked.sum() / n_sel, 0.8, n_sel)
    assert within_3se(random.sum() / n_sel, 0.1 - 0.1 / n_replacements, n_sel)
    assert within_3se(unchanged.sum() / n_sel, 0.1 + 0.1 / n_replacements, n_sel)
    assert not np.isin(inputs[random], wordpiece.all_special_ids).any()  # replacements are never special


def word_groups(tokenizer, row):
    """Token positions of each word, found independently of the objective:
    a "##" token continues the word before it, unless that was special."""
    special = set(tokenizer.all_special_ids)
    groups, previous_special = [], True
    for pos, token_id in enumerate(row.tolist()):
        if token_id in special:
            previous_special = True
            continue
        if tokenizer.id_to_token(token_id).startswith("##") and not previous_special:
            groups[-1].append(pos)
        else:
            groups.append([pos])
        previous_special = False
    return groups


def test_whole_word_masks_all_or_none(wordpiece, wp_shards):
    mlm = get_objective("mlm", wordpiece, whole_word=True)
    examples = mlm.examples(wp_shards, 256)
    ids = list(range(32))
    batch = batch_of(mlm, examples, ids, epoch=1)
    selected = batch["labels"].numpy() != IGNORE_INDEX
    multi = selected_multi = 0
    for row, i in enumerate(ids):
        for group in word_groups(wordpiece, examples[i]):
            flags = selected[row, group]
            assert flags.all() or not flags.any()
            if len(group) > 1:
                multi += 1
                selected_multi += int(flags.all())
    assert multi > 100 and selected_multi > 5  # the rule was exercised on multi-token words


def test_whole_word_byte_level_bpe(bpe, bpe_shards):
    """Ġ marks a word start; a token without it continues the word (unless after a special)."""
    mlm = get_objective("mlm", bpe, whole_word=True)
    examples = mlm.examples(bpe_shards, 256)
    ids = list(range(32))
    batch = batch_of(mlm, examples, ids)
    selected = batch["labels"].numpy() != IGNORE_INDEX
    special = set(bpe.all_special_ids)
    seen_multi = 0
    for row, i in enumerate(ids):
        group, previous_special = [], True
        for pos, token_id in enumerate(examples[i].tolist() + [bpe.sep_token_id]):
            is_start = token_id in special or previous_special or bpe.id_to_token(token_id).startswith("Ġ")
            if is_start and group:
                assert selected[row, group].all() or not selected[row, group].any()
                seen_multi += len(group) > 1
                group = []
            if token_id not in special:
                group.append(pos)
            previous_special = token_id in special
    assert seen_multi > 100
    assert 0.1 < selected.sum() / selected.size < 0.2
    # Sentinels are added special tokens: never a random replacement.
    sentinels = [bpe.token_to_id(f"<extra_id_{i}>") for i in range(N_SENTINELS)]
    assert not np.isin(batch["input_ids"].numpy(), sentinels).any()


def test_static_and_dynamic_masking(wordpiece, wp_shards):
    ids = list(range(8))
    for masking in ("static", "dynamic"):
        mlm = get_objective("mlm", wordpiece, masking=masking, seed=5)
        examples = mlm.examples(wp_shards, 128)
        first, again, later = (batch_of(mlm, examples, ids, epoch) for epoch in (0, 0, 1))
        assert torch.equal(first["input_ids"], again["input_ids"])  # a pure function of its arguments
        same = torch.equal(first["labels"], later["labels"]) and torch.equal(first["input_ids"], later["input_ids"])
        assert same == (masking == "static")
    other_seed = get_objective("mlm", wordpiece, masking="static", seed=6)
    assert not torch.equal(batch_of(other_seed, examples, ids, 0)["labels"], first["labels"])


def test_batch_is_per_sample(wordpiece, wp_shards, bpe, bpe_shards):
    """A sample's masking depends on (seed, epoch, sample_id) only, never on its batch
    neighbours: what DDP ranks and a resumed run rely on."""
    cases = [(get_objective("mlm", wordpiece, whole_word=True), wp_shards, 128),
             (get_objective("mlm", wordpiece, nsp=True), wp_shards, 128),
             (get_objective("span", bpe), bpe_shards, 128),
             (get_objective("clm", bpe), bpe_shards, 128)]
    for objective, shards, seq_len in cases:
        examples = objective.examples(shards, seq_len)
        full = batch_of(objective, examples, list(range(10)), epoch=2)
        part = batch_of(objective, examples, [7, 2], epoch=2)
        for key, value in part.items():
            assert torch.equal(value, full[key][[7, 2]]), (objective.name, key)


def test_mlm_bad_input(wordpiece, wp_shards, bpe):
    backend = Backend(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="mask_token"):
        get_objective("mlm", Tokenizer(backend, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="mlm_probability"):
        get_objective("mlm", wordpiece, mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio \\+ random_ratio"):
        get_objective("mlm", wordpiece, mask_ratio=0.8, random_ratio=0.3)
    with pytest.raises(ValueError, match="masking"):
        get_objective("mlm", wordpiece, masking="sometimes")
    with pytest.raises(ValueError, match="no option 'mlm_prob'"):
        get_objective("mlm", wordpiece, mlm_prob=0.2)
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("mlm2", wordpiece)
    mlm = get_objective("mlm", wordpiece)
    tiny = TokenShards.from_documents([[10, 11, 12]], wordpiece.vocab_size)
    with pytest.raises(ValueError, match="too small"):
        mlm.examples(tiny, 128)
    examples = mlm.examples(wp_shards, 64)
    with pytest.raises(ValueError, match="sample_ids"):
        mlm.collate([examples[0], examples[1]], [0], 0)


# ------------------------------------------------------------------ NSP --

def test_nsp_pairs(wordpiece, wp_shards):
    mlm = get_objective("mlm", wordpiece, nsp=True, seed=1)
    seq_len = 64
    examples = mlm.examples(wp_shards, seq_len)
    n = min(len(examples), 3000)
    assert n > 1000
    cls, sep, pad = wordpiece.cls_token_id, wordpiece.sep_token_id, wordpiece.pad_token_id
    docs = [wp_shards.document(i).tolist() for i in range(wp_shards.n_docs)]

    def contains(haystack, needle):
        return any(haystack[k:k + len(needle)] == needle for k in range(len(haystack) - len(needle) + 1))

    labels = []
    for i in range(n):
        ex = examples[i]
        ids, types, mask = ex["input_ids"], ex["token_type_ids"], ex["attention_mask"]
        real = int(mask.sum())
        assert mask[:real].all() and not mask[real:].any() and (ids[real:] == pad).all()
        seps = np.nonzero(ids[:real] == sep)[0]
        assert ids[0] == cls and len(seps) == 2 and seps[1] == real - 1
        a, b = ids[1:seps[0]].tolist(), ids[seps[0] + 1:real - 1].tolist()
        assert len(a) >= 1 and len(b) >= 1
        # token_type_ids: 0 for [CLS] A [SEP], 1 for B [SEP], 0 at padding.
        np.testing.assert_array_equal(types, np.r_[np.zeros(len(a) + 2), np.ones(len(b) + 1),
                                                   np.zeros(seq_len - real)])
        labels.append(ex["next_sentence_label"])
        if i % 50 == 0:  # the content: B follows A in its document, or comes from elsewhere
            homes = [d for d in docs if contains(d, a)]
            if ex["next_sentence_label"] == 0:
                assert any(contains(d, a + b) for d in homes)
            else:
                assert any(contains(d, b) for d in docs if d not in homes[:1])
    assert within_3se(np.mean(labels), 0.5, n)
    # Pairs are fixed per index (BERT's pre-built pairs); masks on top follow the epoch.
    again = mlm.examples(wp_shards, seq_len)[5]
    assert all(np.array_equal(again[k], examples[5][k]) for k in ("input_ids", "token_type_ids"))

    batch = batch_of(mlm, examples, list(range(16)), epoch=0)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label"}
    labels_t = batch["labels"]
    assert not bool(((labels_t != IGNORE_INDEX) & (batch["attention_mask"] == 0)).any())  # padding never masked
    assert mlm.target_counts(batch) == {"mlm": int((labels_t != IGNORE_INDEX).sum()), "nsp": 16}


# ----------------------------------------------------------------- span --

def test_span_lengths_fit_seq_len():
    # T5's numbers: 512 input tokens come from 568 raw ones, targets 114.
    assert input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    for seq_len in range(4, 700):
        raw, targets = input_and_target_lengths(seq_len, 0.15, 3.0)
        noise, spans = noise_counts(raw, 0.15, 3.0)
        assert raw - noise + spans + 1 == seq_len
        assert noise + spans + 1 == targets
        if seq_len >= 12:  # T5's helper, without the mask's clamps, agrees
            t5_noise = round(raw * 0.15)
            t5_inputs = lambda t: t - round(t * 0.15) + round(round(t * 0.15) / 3) + 1  # noqa: E731
            assert t5_inputs(raw) == seq_len < t5_inputs(raw + 1)
            assert (t5_noise, round(t5_noise / 3)) == (noise, spans)


def test_span_corruption(bpe, bpe_shards):
    span = get_objective("span", bpe, seed=2)
    assert (span.name, span.model_family) == ("span", "t5")
    seq_len = 512
    examples = span.examples(bpe_shards, seq_len)
    raw = span.raw_length(seq_len)
    assert raw == 568 and len(examples[0]) == raw
    ids = list(range(64))
    batch = batch_of(span, examples, ids, epoch=0)
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    assert inputs.shape == (64, seq_len) and bool((batch["attention_mask"] == 1).all())  # exactly seq_len
    assert (inputs[:, -1] == bpe.eos_token_id).all() and (labels[:, -1] == bpe.eos_token_id).all()
    sentinel_ids = np.array([bpe.token_to_id(f"<extra_id_{i}>") for i in range(N_SENTINELS)])
    noise_tokens, span_lengths = 0, []
    for row, i in enumerate(ids):
        # Reconstruction gives the raw block back exactly.
        np.testing.assert_array_equal(span.reconstruct(inputs[row], labels[row]), examples[i])
        np.testing.assert_array_equal(reconstruct(inputs[row], labels[row], sentinel_ids, bpe.eos_token_id),
                                      examples[i])
        # Sentinels: unique, in order <extra_id_0>, <extra_id_1>, ... in inputs and targets alike;
        # the targets start with one and end with a span + EOS (no trailing sentinel).
        in_sent = inputs[row][np.isin(inputs[row], sentinel_ids)]
        out_sent = labels[row][np.isin(labels[row], sentinel_ids)]
        k = len(in_sent)
        np.testing.assert_array_equal(in_sent, sentinel_ids[:k])
        np.testing.assert_array_equal(out_sent, sentinel_ids[:k])
        assert labels[row][0] == sentinel_ids[0] and labels[row][-2] not in sentinel_ids
        positions = np.r_[np.nonzero(np.isin(labels[row], sentinel_ids))[0], len(labels[row]) - 1]
        lengths = np.diff(positions) - 1
        span_lengths += lengths.tolist()
        noise_tokens += int(lengths.sum())
    assert noise_tokens / (64 * raw) == pytest.approx(round(raw * 0.15) / raw)  # T5: exactly round(L * 0.15)
    assert abs(noise_tokens / (64 * raw) - 0.15) < 0.005
    assert abs(np.mean(span_lengths) - 3.0) < 0.1 and min(span_lengths) >= 1
    assert np.std(span_lengths) > 1.0  # random segmentation, not fixed-length spans
    assert span.target_counts(batch) == {"span": int((labels != IGNORE_INDEX).sum())}


def test_random_spans_noise_mask_statistics():
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(200, 0.15, 3.0, rng) for _ in range(2000)])
    assert (masks.sum(1) == 30).all()  # round(200 * 0.15)
    starts = masks & ~np.c_[np.zeros((len(masks), 1), bool), masks[:, :-1]]
    assert (starts.sum(1) == 10).all()  # round(30 / 3) spans
    assert not masks[:, 0].any() and masks[:, -1].all()  # T5: starts with non-noise, ends with noise
    # Away from the fixed ends, every position is noise about 15% of the time.
    middle = masks[:, 20:180].mean(0)
    assert np.abs(middle - 0.15).max() < 4 * math.sqrt(0.15 * 0.85 / len(masks))


def test_span_static_dynamic_and_errors(bpe, bpe_shards, wordpiece):
    static = get_objective("span", bpe, masking="static")
    dynamic = get_objective("span", bpe, masking="dynamic")
    examples = static.examples(bpe_shards, 64)
    ids = [0, 1, 2]
    assert torch.equal(batch_of(static, examples, ids, 0)["labels"], batch_of(static, examples, ids, 4)["labels"])
    assert not torch.equal(batch_of(dynamic, examples, ids, 0)["labels"],
                           batch_of(dynamic, examples, ids, 4)["labels"])
    no_sentinels = Tokenizer(wordpiece.backend, eos_token="[SEP]", pad_token="[PAD]")
    with pytest.raises(ValueError, match="sentinel"):
        get_objective("span", no_sentinels).examples(bpe_shards, 64)
    with pytest.raises(ValueError, match="eos_token"):
        get_objective("span", wordpiece)
    with pytest.raises(ValueError, match="noise_density"):
        get_objective("span", bpe, noise_density=1.5)
    with pytest.raises(ValueError, match="no span"):
        reconstruct([5, 7, 2], [8, 9, 2], [7, 8], eos_id=2)
    with pytest.raises(ValueError, match="end with EOS"):
        reconstruct([5, 7], [7, 9, 2], [7, 8], eos_id=2)


# --------------------------------------------------------------- losses --

def _tensor_close(term: LossTerm, mean: torch.Tensor, count: int):
    assert term.sum.dtype == torch.float32 and term.sum.dim() == 0 and term.sum.requires_grad
    torch.testing.assert_close(term.sum, mean.float() * count, rtol=1e-5, atol=1e-5)


def test_loss_terms_match_models(bpe, bpe_shards, wordpiece, wp_shards):
    from llmkit.models.bert import BertConfig, BertForMaskedLM, BertForPreTraining
    from llmkit.models.gpt import GPT, GPTConfig
    from llmkit.models.t5 import T5, T5Config

    torch.manual_seed(0)
    ids = [0, 5, 9, 11]

    clm = get_objective("clm", bpe)
    gpt = GPT(GPTConfig.preset("gpt-tiny", vocab_size=bpe.vocab_size)).eval()
    batch = batch_of(clm, clm.examples(bpe_shards, 64), ids)
    terms = clm.loss_terms(gpt, batch)
    assert set(terms) == set(clm.target_counts(batch))
    _tensor_close(terms["clm"], gpt(batch["input_ids"], labels=batch["labels"]).loss, clm.target_counts(batch)["clm"])
    terms["clm"].sum.backward()

    config = BertConfig.from_preset("bert-tiny", vocab_size=wordpiece.vocab_size, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    mlm = get_objective("mlm", wordpiece)
    bert = BertForMaskedLM(config).eval()
    batch = batch_of(mlm, mlm.examples(wp_shards, 64), ids)
    terms = mlm.loss_terms(bert, batch)
    out = bert(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    count = mlm.target_counts(batch)["mlm"]
    _tensor_close(terms["mlm"], out.loss, count)
    selected = batch["labels"] != IGNORE_INDEX
    assert int(terms["mlm"].correct) == int((out.logits.argmax(-1)[selected] == batch["labels"][selected]).sum())
    terms["mlm"].sum.backward()
    assert bert.mlm.dense.weight.grad is not None
    wrapped = ObjectiveModule(bert, mlm)(batch)  # what DDP / FSDP wrap
    torch.testing.assert_close(wrapped["mlm"].sum, terms["mlm"].sum)

    nsp = get_objective("mlm", wordpiece, nsp=True)
    pre = BertForPreTraining(config).eval()
    batch = batch_of(nsp, nsp.examples(wp_shards, 64), ids)
    terms = nsp.loss_terms(pre, batch)
    counts = nsp.target_counts(batch)
    out = pre(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              next_sentence_label=batch["next_sentence_label"], token_type_ids=batch["token_type_ids"])
    torch.testing.assert_close(terms["mlm"].sum / counts["mlm"] + terms["nsp"].sum / counts["nsp"], out.loss)
    nsp_correct = (out.extra["nsp_logits"].argmax(-1) == batch["next_sentence_label"]).sum()
    assert int(terms["nsp"].correct) == int(nsp_correct)
    with pytest.raises(ValueError, match="next-sentence head"):
        nsp.loss_terms(bert, batch)
    with pytest.raises(ValueError, match="encoder and an MLM head"):
        mlm.loss_terms(gpt, batch)

    span = get_objective("span", bpe)
    t5 = T5(T5Config.from_preset("t5-tiny", vocab_size=bpe.vocab_size, pad_token_id=bpe.pad_token_id,
                                 eos_token_id=bpe.eos_token_id, decoder_start_token_id=bpe.pad_token_id,
                                 dropout_rate=0.0)).eval()
    batch = batch_of(span, span.examples(bpe_shards, 64), ids)
    terms = span.loss_terms(t5, batch)
    out = t5(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    _tensor_close(terms["span"], out.loss, span.target_counts(batch)["span"])
    terms["span"].sum.backward()
