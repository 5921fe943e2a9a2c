"""Masked language modelling as BERT / RoBERTa (+ optional next-sentence prediction).

Masking (transformers' DataCollatorForLanguageModeling, BERT's
create_pretraining_data): each non-special token is selected with
probability ``mlm_probability`` (an independent Bernoulli draw per token, so
the count is binomial, as the HF collator); a selected token becomes [MASK]
with probability ``mask_ratio``, a random non-special token with
``random_ratio`` and stays unchanged otherwise. ``labels`` hold the original
id at selected positions and -100 elsewhere; special tokens ([CLS], [SEP],
padding, sentinels, ...) are never selected.

Whole-word masking (``whole_word=True``): the Bernoulli draw is per word, and
every token of a selected word is selected; a word is a word-start token and
the continuation tokens after it (WordPiece "##x"; for byte-level BPE "Ġ"
and SentencePiece "▁" vocabularies, a token *without* the marker continues
the previous word), and a token right after a special token always starts a
word. Each token's marginal selection probability stays ``mlm_probability``.
The 80/10/10 decision is then made per token, as both BERT's
create_pretraining_data and transformers' DataCollatorForWholeWordMask do:
the per-token branch statistics stay exactly those of token masking.

Static vs dynamic (RoBERTa, section 4.1): the masks come from
``default_rng([seed, epoch, sample_id])``; ``masking="static"`` uses epoch 0
always (one fixed mask per sample, like BERT's pre-masked data, without
BERT's 10 duplicated copies), ``"dynamic"`` a new mask every epoch.

Examples:
  * ``nsp=False`` (RoBERTa FULL-SENTENCES): full blocks
    ``<s> stream... </s>`` packed across documents with </s> ([SEP]) after
    each document; no padding; batch input_ids, attention_mask (all ones),
    labels.
  * ``nsp=True`` (BERT): ``[CLS] A [SEP] B [SEP]`` pairs, token_type_ids 0
    for [CLS] A [SEP] and 1 for B [SEP], padded to seq_len. Documents are the
    unit (no sentence splitting is done): each document is cut into chunks of
    at most seq_len - 3 tokens, every chunk is one example, split at a random
    point into A and its true continuation B; with probability 1/2 B is
    replaced by as many tokens from a random place of a random other
    document (``next_sentence_label`` 1 = random, 0 = B follows A, as
    transformers). The pairs are fixed per index (their generator is
    ``default_rng([seed, index, NSP_STREAM])``); the masks follow the rules
    above.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import (IGNORE_INDEX, LossTerm, Objective, check_not_empty, check_seq_len, special_ids,
                   to_model_device)
from .blocks import PackedBlocks

NSP_STREAM = 0x4E5350  # "NSP": keeps the pair generators apart from the mask generators


def _probability(name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def continuation_table(tokenizer) -> np.ndarray:
    """Boolean per id: does this token continue the previous word (whole-word masking)?"""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    size = max(tokenizer.vocab_size, max(vocab.values()) + 1)
    table = np.zeros(size, dtype=bool)
    tokens = list(vocab)
    if any(t.startswith("##") for t in tokens):  # WordPiece
        for token, i in vocab.items():
            table[i] = token.startswith("##") and len(token) > 2
    else:
        marker = next((m for m in ("Ġ", "▁") if any(t.startswith(m) for t in tokens)), None)
        if marker is None:
            raise ValueError("whole_word masking needs word boundaries in the vocabulary: WordPiece '##' "
                             "continuations, or byte-level BPE 'Ġ' / SentencePiece '▁' word starts")
        for token, i in vocab.items():
            table[i] = not token.startswith(marker)
    table[special_ids(tokenizer)] = False
    return table


class SentencePairs:
    """BERT's NSP examples (see the module docstring): item i is a dict of
    numpy arrays input_ids / token_type_ids / attention_mask (seq_len) and
    the int next_sentence_label."""

    def __init__(self, shards, seq_len: int, cls_id: int, sep_id: int, pad_id: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.max_tokens = seq_len - 3
        self.doc_starts = np.asarray(shards.doc_starts, dtype=np.int64)
        self.lengths = np.diff(self.doc_starts)
        # Even split into ceil(len / max_tokens) chunks: every chunk has >= 2 tokens
        # when max_tokens >= 4 (a single-token document has no A / B split and is skipped).
        n_chunks = np.where(self.lengths >= 2, -(-self.lengths // self.max_tokens), 0)
        self.docs = np.nonzero(n_chunks)[0]
        self.n_chunks = n_chunks
        self.offsets = np.concatenate([[0], np.cumsum(n_chunks[self.docs])]).astype(np.int64)
        self.nonempty = np.nonzero(self.lengths > 0)[0]
        if len(self) and len(self.nonempty) < 2:
            raise ValueError("next-sentence prediction needs at least 2 non-empty documents "
                             "(B is drawn from another document half of the time)")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} is outside [0, {len(self)})")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        doc, c = int(self.docs[k]), i - int(self.offsets[k])
        n, length, start = int(self.n_chunks[doc]), int(self.lengths[doc]), int(self.doc_starts[doc])
        chunk = self.shards.tokens(start + length * c // n, start + length * (c + 1) // n)
        rng = np.random.default_rng([self.seed, i, NSP_STREAM])
        split = int(rng.integers(1, len(chunk)))
        a = chunk[:split]
        is_random = bool(rng.random() < 0.5)
        if is_random:
            # A uniformly chosen other non-empty document, and a random window of it.
            pos = int(np.searchsorted(self.nonempty, doc))
            j = int(rng.integers(len(self.nonempty) - 1))
            other = int(self.nonempty[j + (j >= pos)])
            take = min(len(chunk) - split, int(self.lengths[other]))
            offset = int(rng.integers(0, int(self.lengths[other]) - take + 1))
            b0 = int(self.doc_starts[other]) + offset
            b = self.shards.tokens(b0, b0 + take)
        else:
            b = chunk[split:]
        real = len(a) + len(b) + 3
        input_ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        input_ids[:real] = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
        token_type_ids = np.zeros(self.seq_len, dtype=np.int64)
        token_type_ids[len(a) + 2:real] = 1
        attention_mask = np.zeros(self.seq_len, dtype=np.int64)
        attention_mask[:real] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                "next_sentence_label": int(is_random)}


class MaskedLM(Objective):
    name = "mlm"
    model_family = "bert"

    def __init__(self, tokenizer, mlm_probability: float = 0.15, mask_ratio: float = 0.8,
                 random_ratio: float = 0.1, whole_word: bool = False, masking: str = "dynamic",
                 nsp: bool = False, seed: int = 0):
        super().__init__(tokenizer, seed=seed, masking=masking)
        self.mlm_probability = _probability("mlm_probability", mlm_probability)
        self.mask_ratio = _probability("mask_ratio", mask_ratio)
        self.random_ratio = _probability("random_ratio", random_ratio)
        if self.mask_ratio + self.random_ratio > 1.0 + 1e-12:
            raise ValueError(f"mask_ratio + random_ratio must be <= 1 (the rest stay unchanged), got "
                             f"{self.mask_ratio} + {self.random_ratio}")
        self.whole_word, self.nsp = bool(whole_word), bool(nsp)
        roles = {"mask_token": tokenizer.mask_token_id, "cls_token": tokenizer.cls_token_id,
                 "sep_token": tokenizer.sep_token_id}
        if self.nsp:
            roles["pad_token"] = tokenizer.pad_token_id
        missing = [name for name, i in roles.items() if i is None]
        if missing:
            raise ValueError(f"masked LM needs the tokenizer's {', '.join(missing)} (set with Tokenizer(backend, "
                             f"{missing[0]}=...); train_tokenizer sets them)")
        self.mask_id, self.cls_id, self.sep_id = roles["mask_token"], roles["cls_token"], roles["sep_token"]
        self.pad_id = tokenizer.pad_token_id
        specials = special_ids(tokenizer)
        size = max(tokenizer.vocab_size, int(specials.max()) + 1 if len(specials) else 0)
        self.is_special = np.zeros(size, dtype=bool)
        self.is_special[specials] = True
        # Random replacements: any non-special token (transformers draws from the whole
        # vocabulary; a special token there would be a token the data never holds).
        self.replacements = np.nonzero(~self.is_special)[0].astype(np.int64)
        if not len(self.replacements):
            raise ValueError("the tokenizer has no non-special tokens to mask")
        self.continuation = continuation_table(tokenizer) if self.whole_word else None

    # -- examples --
    def examples(self, shards, seq_len: int):
        if self.nsp:
            seq_len = check_seq_len(seq_len, 7, "next-sentence pairs ([CLS] A [SEP] B [SEP], A and B up to "
                                                "half of seq_len - 3 tokens each)")
            pairs = SentencePairs(shards, seq_len, self.cls_id, self.sep_id, self.pad_id, self.seed)
            return check_not_empty(pairs, shards, seq_len, "next-sentence")
        seq_len = check_seq_len(seq_len, 3, "masked LM blocks ([CLS] tokens [SEP])")
        blocks = PackedBlocks(shards, seq_len, self.sep_id, prefix=[self.cls_id], suffix=[self.sep_id])
        return check_not_empty(blocks, shards, seq_len, "masked LM")

    # -- masking --
    def mask_tokens(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one sequence. The draws have fixed sizes (len(ids)
        each), so a sample's mask depends on nothing but its generator."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.is_special)):
            raise ValueError(f"token ids must be in [0, {len(self.is_special)}) (the tokenizer's vocabulary), "
                             f"got {int(ids.min())}..{int(ids.max())}")
        n = len(ids)
        select_u, branch_u = rng.random(n), rng.random(n)
        random_pick = rng.integers(len(self.replacements), size=n)
        special = self.is_special[ids]
        if self.whole_word:
            after_special = np.concatenate([[True], special[:-1]])
            starts = ~self.continuation[ids] | special | after_special
            select_u = select_u[np.cumsum(starts) - 1]  # one draw per word
        selected = (select_u < self.mlm_probability) & ~special
        labels = np.where(selected, ids, IGNORE_INDEX)
        inputs = ids.copy()
        to_mask = selected & (branch_u < self.mask_ratio)
        to_random = selected & (branch_u >= self.mask_ratio) & (branch_u < self.mask_ratio + self.random_ratio)
        inputs[to_mask] = self.mask_id
        inputs[to_random] = self.replacements[random_pick[to_random]]
        return inputs, labels

    def collate(self, examples: list, sample_ids: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        sample_ids = self._check_batch_args(examples, sample_ids, epoch)
        if self.nsp:
            if not all(isinstance(e, dict) for e in examples):
                raise ValueError("with nsp=True, collate takes the sentence-pair examples of examples()")
            ids = [e["input_ids"] for e in examples]
        else:
            ids = [np.asarray(e, dtype=np.int64) for e in examples]
        if len({len(x) for x in ids}) != 1:
            raise ValueError(f"masked LM examples must all have one length, got {sorted({len(x) for x in ids})}")
        masked = [self.mask_tokens(x, self.rng(epoch, sid)) for x, sid in zip(ids, sample_ids)]
        batch = {"input_ids": torch.from_numpy(np.stack([m[0] for m in masked])),
                 "labels": torch.from_numpy(np.stack([m[1] for m in masked]))}
        if self.nsp:
            batch["attention_mask"] = torch.from_numpy(np.stack([e["attention_mask"] for e in examples]))
            batch["token_type_ids"] = torch.from_numpy(np.stack([e["token_type_ids"] for e in examples]))
            batch["next_sentence_label"] = torch.tensor([e["next_sentence_label"] for e in examples],
                                                        dtype=torch.int64)
        else:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    def target_counts(self, batch: dict) -> dict[str, int]:
        counts = {"mlm": int((batch["labels"] != IGNORE_INDEX).sum())}
        if self.nsp:
            counts["nsp"] = int(batch["next_sentence_label"].numel())
        return counts

    # -- loss --
    def loss_terms(self, model, batch: dict) -> dict[str, LossTerm]:
        """Summed losses; the MLM head runs on the selected positions only (about
        15% of the tokens: the (tokens, vocab) logits are the costliest tensor)."""
        encoder, head = getattr(model, "encoder", None), getattr(model, "mlm", None)
        if encoder is None or head is None or not hasattr(encoder, "encode"):
            raise ValueError(f"masked LM trains a model with an encoder and an MLM head (BertForMaskedLM, "
                             f"BertForPreTraining), got {type(model).__name__}")
        if self.nsp and getattr(model, "nsp", None) is None:
            raise ValueError(f"nsp=True needs a model with a next-sentence head (BertForPreTraining), "
                             f"got {type(model).__name__}")
        batch = to_model_device(batch, model)
        inputs = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        x, packed = encoder.encode(batch["input_ids"], batch.get("attention_mask"), **inputs)
        labels = packed.pack(batch["labels"])
        rows = labels != IGNORE_INDEX
        targets = labels[rows]
        logits = head(x[rows], encoder.word_embeddings.weight)
        terms = {"mlm": LossTerm(sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
                                 correct=(logits.argmax(-1) == targets).sum())}
        if self.nsp:
            nsp_logits = model.nsp(encoder.pool(x, packed))
            nsp_labels = batch["next_sentence_label"]
            terms["nsp"] = LossTerm(sum=F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="sum"),
                                    correct=(nsp_logits.argmax(-1) == nsp_labels).sum())
        return terms
