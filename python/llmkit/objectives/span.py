"""Span corruption as T5 (Raffel et al. 2020, section 3.1.4; t5.data.preprocessors.span_corruption).

A raw block of tokens is split into alternating non-noise / noise spans by
T5's ``random_spans_noise_mask``: round(length * noise_density) noise tokens
in round(noise / mean_noise_span_length) spans, the span lengths a random
segmentation of each total, starting with non-noise (so the block ends with a
noise span). Then (``noise_span_to_unique_sentinel`` and its inverse):

    inputs  = non-noise tokens, noise span i replaced by <extra_id_i>, EOS
    targets = <extra_id_0> span 0 <extra_id_1> span 1 ... span k-1, EOS

(no trailing sentinel: as T5's preprocessors and transformers'
run_t5_mlm_flax.py). Sentinels are looked up by name, "<extra_id_i>" (T5's
vocabulary puts them at the top; train_tokenizer(sentinels=N) adds them).

Lengths: as T5's ``random_spans_helper`` / transformers'
``compute_input_and_target_lengths``, the raw block length is the largest one
whose corrupted inputs (non-noise + one sentinel per span + EOS) fit in
seq_len; since that input length grows by 0 or 1 per raw token, it is
exactly seq_len, so no input padding (seq_len 512 -> raw blocks of 568
tokens, targets of 114). The raw blocks are packed across documents with EOS
after every document, like the causal LM's (T5 concatenates without a
separator; the EOS keeps the boundary visible).

Masks come from ``default_rng([seed, epoch, sample_id])`` (epoch 0 under
``masking="static"``), one generator per sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX, LossTerm, Objective, check_not_empty, check_seq_len, to_model_device
from .blocks import PackedBlocks


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a block, as random_spans_noise_mask counts them."""
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's random_spans_noise_mask (random_roll=False) with a numpy generator: bool (length,)."""
    orig_length = length
    length = max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise = length - num_noise

    def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        # num_items split into num_segments non-empty parts, uniformly over the compositions.
        first_in_segment = np.arange(num_items - 1) < num_segments - 1
        rng.shuffle(first_in_segment)
        segment_id = np.cumsum(np.concatenate([[False], first_in_segment]))
        return np.bincount(segment_id, minlength=num_segments)

    noise_lengths = random_segmentation(num_noise, num_spans)
    nonnoise_lengths = random_segmentation(num_nonnoise, num_spans)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    np.add.at(indicator, span_starts[span_starts < length], 1)
    is_noise = np.cumsum(indicator) % 2 == 1
    return is_noise[:orig_length]


def input_and_target_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float
                             ) -> tuple[int, int]:
    """T5's random_spans_helper / transformers' compute_input_and_target_lengths:
    (raw tokens per block, targets length) for corrupted inputs of inputs_length.

    The counts are the noise mask's own (noise_counts, with its clamps to at
    least one noise token and one span); T5's helper leaves the clamps out,
    which only matters below ~10 tokens, where it would overshoot by one."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    # lengths(t)[0] <= t + 1 and grows by 0 or 1 per raw token: the largest
    # raw length that fits gives inputs of exactly inputs_length.
    tokens_length = max(2, inputs_length - 1)
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's tweak for 50% noise
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray, eos_id: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one block: noise_span_to_unique_sentinel and its inverse, each + EOS."""

    def replace_spans(mask: np.ndarray) -> np.ndarray:
        previous = np.concatenate([[False], mask[:-1]])
        first = mask & ~previous
        n_spans = int(first.sum())
        if n_spans > len(sentinel_ids):
            raise ValueError(f"{n_spans} noise spans but only {len(sentinel_ids)} sentinel tokens")
        span = np.cumsum(first) - 1
        out = np.where(first, sentinel_ids[np.maximum(span, 0)] if n_spans else tokens, tokens)
        return np.concatenate([out[~(mask & previous)], [eos_id]]).astype(np.int64)

    tokens = np.asarray(tokens, dtype=np.int64)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    return replace_spans(noise_mask), replace_spans(~noise_mask)


def reconstruct(inputs, targets, sentinel_ids: Sequence[int], eos_id: int | None = None) -> np.ndarray:
    """The raw block back from one corrupted (inputs, targets) pair: each
    sentinel of the inputs replaced by the tokens that follow the same
    sentinel in the targets. Padding must be removed from ``inputs``; -100
    entries of ``targets`` are dropped; with ``eos_id`` the final EOS of each
    is dropped (EOS separators inside the block stay)."""
    inputs = np.asarray(inputs, dtype=np.int64).ravel()
    targets = np.asarray(targets, dtype=np.int64).ravel()
    targets = targets[targets != IGNORE_INDEX]
    if eos_id is not None:
        for name, seq in (("inputs", inputs), ("targets", targets)):
            if not len(seq) or seq[-1] != eos_id:
                raise ValueError(f"{name} must end with EOS ({eos_id})")
        inputs, targets = inputs[:-1], targets[:-1]
    index = {int(s): i for i, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if t in index:
            current = index[t]
            if current in spans:
                raise ValueError(f"sentinel {t} appears twice in the targets")
            spans[current] = []
        elif current is None:
            raise ValueError("targets must start with a sentinel")
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs.tolist():
        if t in index:
            if index[t] not in spans:
                raise ValueError(f"sentinel {t} of the inputs has no span in the targets")
            out.extend(spans.pop(index[t]))
        else:
            out.append(t)
    if spans:
        raise ValueError(f"targets hold spans for sentinels absent from the inputs: "
                         f"{[int(sentinel_ids[i]) for i in sorted(spans)]}")
    return np.array(out, dtype=np.int64)


class SpanCorruption(Objective):
    name = "span"
    model_family = "t5"

    def __init__(self, tokenizer, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                 masking: str = "dynamic", seed: int = 0):
        super().__init__(tokenizer, seed=seed, masking=masking)
        self.noise_density = float(noise_density)
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        self.mean_noise_span_length = float(mean_noise_span_length)
        if self.mean_noise_span_length < 1.0:
            raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("span corruption needs the tokenizer's eos_token (it ends inputs and targets)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        sentinels = []
        while (i := tokenizer.token_to_id(f"<extra_id_{len(sentinels)}>")) is not None:
            sentinels.append(i)
        self.sentinel_ids = np.array(sentinels, dtype=np.int64)

    def raw_length(self, seq_len: int) -> int:
        """Raw tokens per block whose corrupted inputs are seq_len tokens (EOS included)."""
        return input_and_target_lengths(seq_len, self.noise_density, self.mean_noise_span_length)[0]

    def _check_sentinels(self, raw_len: int) -> None:
        _, spans = noise_counts(raw_len, self.noise_density, self.mean_noise_span_length)
        if spans > len(self.sentinel_ids):
            raise ValueError(f"blocks of {raw_len} raw tokens get {spans} noise spans, but the tokenizer has "
                             f"{len(self.sentinel_ids)} sentinel tokens <extra_id_0>.. (needs <extra_id_0> .. "
                             f"<extra_id_{spans - 1}>; train_tokenizer(..., sentinels={max(spans, 100)}))")

    def examples(self, shards, seq_len: int) -> PackedBlocks:
        seq_len = check_seq_len(seq_len, 4, "span corruption (tokens, a sentinel and EOS)")
        raw_len = self.raw_length(seq_len)
        self._check_sentinels(raw_len)
        return check_not_empty(PackedBlocks(shards, raw_len, self.eos_id), shards, raw_len, "span corruption")

    def corrupt(self, block: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one raw block."""
        block = np.asarray(block, dtype=np.int64)
        self._check_sentinels(len(block))
        mask = random_spans_noise_mask(len(block), self.noise_density, self.mean_noise_span_length, rng)
        return corrupt(block, mask, self.sentinel_ids, self.eos_id)

    def collate(self, examples: list, sample_ids: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        sample_ids = self._check_batch_args(examples, sample_ids, epoch)
        pairs = [self.corrupt(e, self.rng(epoch, sid)) for e, sid in zip(examples, sample_ids)]
        # Full blocks give equal lengths; pad anyway for blocks of other lengths
        # (inputs with pad + attention_mask 0, labels with -100).
        in_len, out_len = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
        input_ids = np.full((len(pairs), in_len), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(pairs), in_len), dtype=np.int64)
        labels = np.full((len(pairs), out_len), IGNORE_INDEX, dtype=np.int64)
        for row, (inputs, targets) in enumerate(pairs):
            input_ids[row, :len(inputs)] = inputs
            attention_mask[row, :len(inputs)] = 1
            labels[row, :len(targets)] = targets
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels)}

    def reconstruct(self, input_ids, labels, attention_mask=None) -> np.ndarray:
        """One row of a batch back to its raw block (see :func:`reconstruct`)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is not None:
            input_ids = input_ids[np.asarray(attention_mask).astype(bool)]
        return reconstruct(input_ids, labels, self.sentinel_ids, self.eos_id)

    def target_counts(self, batch: dict) -> dict[str, int]:
        return {"span": int((batch["labels"] != IGNORE_INDEX).sum())}

    def loss_terms(self, model, batch: dict) -> dict[str, LossTerm]:
        if not hasattr(model, "shift_right"):
            raise ValueError(f"span corruption trains an encoder-decoder (llmkit.models.T5), "
                             f"got {type(model).__name__}")
        batch = to_model_device(batch, model)
        labels = batch["labels"]
        # Decoder inputs given, labels not: the model's own mean loss is not computed twice.
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=model.shift_right(labels)).logits
        rows = labels != IGNORE_INDEX
        logits, targets = logits[rows], labels[rows]
        return {"span": LossTerm(sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
                                 correct=(logits.argmax(-1) == targets).sum())}
