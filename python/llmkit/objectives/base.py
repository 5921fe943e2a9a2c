"""What every pretraining objective shares: the Objective interface, LossTerm
and the per-sample random generators.

An objective turns token shards into examples (``examples``), examples into
a batch of tensors (``collate``) and a batch plus a model into summed losses
(``loss_terms``). Losses are *sums* with their target counts
(``target_counts``) so that the trainer can divide by the count over the
whole global batch: gradient accumulation and data parallel ranks then give
exactly the full-batch mean.

Determinism: every random choice of ``collate`` comes from
``np.random.default_rng([seed, epoch, sample_id])`` (epoch 0 when masking is
static), one generator per sample, so a sample's masking does not depend on
which other samples share its batch, on the rank that holds it, or on
whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # label the losses skip (as transformers and torch's cross_entropy)


@dataclass
class LossTerm:
    """One objective's loss over a micro-batch: ``sum`` of the per-target
    losses (fp32 scalar with grad) and ``correct`` (argmax == label count, or
    None where the objective does not compute logits)."""

    sum: torch.Tensor
    correct: torch.Tensor | None = None


class ExampleSet(Protocol):
    """What ``Objective.examples`` returns: a deterministic sequence."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int): ...


def check_masking(masking: str) -> str:
    if masking not in ("dynamic", "static"):
        raise ValueError(f'masking must be "dynamic" (new masks every epoch, RoBERTa) or "static" '
                         f'(one fixed mask per sample, BERT), got {masking!r}')
    return masking


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def special_ids(tokenizer) -> np.ndarray:
    """Ids never masked or drawn as random replacements: the named special
    tokens plus every added token the backend marks special (sentinels)."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer.backend, "get_added_tokens_decoder", None)
    if decoder is not None:
        ids.update(i for i, token in decoder().items() if getattr(token, "special", False))
    return np.array(sorted(ids), dtype=np.int64)


class Objective:
    """Base class: see the module docstring and each subclass."""

    name: str = ""
    model_family: str = ""

    def __init__(self, tokenizer, seed: int = 0, masking: str = "dynamic"):
        self.tokenizer = tokenizer
        self.seed = check_seed(seed)
        self.masking = check_masking(masking)

    # -- to implement --
    def examples(self, shards, seq_len: int) -> ExampleSet:
        raise NotImplementedError

    def collate(self, examples: list, sample_ids: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def target_counts(self, batch: dict) -> dict[str, int]:
        raise NotImplementedError

    def loss_terms(self, model, batch: dict) -> dict[str, LossTerm]:
        raise NotImplementedError

    # -- shared helpers --
    def rng(self, epoch: int, sample_id: int) -> np.random.Generator:
        """The generator of one sample: a pure function of (seed, epoch, sample_id);
        the epoch is ignored under static masking (BERT's fixed masks)."""
        epoch = 0 if self.masking == "static" else int(epoch)
        return np.random.default_rng([self.seed, epoch, int(sample_id)])

    @staticmethod
    def _check_batch_args(examples, sample_ids, epoch) -> list[int]:
        sample_ids = [int(i) for i in sample_ids]
        if len(examples) != len(sample_ids):
            raise ValueError(f"collate got {len(examples)} examples but {len(sample_ids)} sample_ids "
                             "(one id per example: it seeds that example's randomness)")
        if not examples:
            raise ValueError("collate got no examples")
        if any(i < 0 for i in sample_ids) or int(epoch) < 0:
            raise ValueError("sample_ids and epoch must be non-negative")
        return sample_ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model_family={self.model_family!r}, seed={self.seed})"


def check_seq_len(seq_len, minimum: int, what: str) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < minimum:
        raise ValueError(f"seq_len must be an int >= {minimum} for {what}, got {seq_len!r}")
    return int(seq_len)


def check_not_empty(examples, shards, seq_len: int, what: str):
    if len(examples) == 0:
        raise ValueError(f"the corpus ({shards.n_tokens} tokens in {shards.n_docs} documents) is too small for "
                         f"one {what} example of {seq_len} tokens: use more data or a shorter seq_len")
    return examples


def to_model_device(batch: dict, model) -> dict:
    """The batch's tensors on the model's device (a no-op when already there)."""
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ObjectiveModule(torch.nn.Module):
    """``model`` and ``objective`` as one module whose forward(batch) is
    ``objective.loss_terms(model, batch)``.

    Wrap *this* in DDP / FSDP (not the bare model): loss_terms may call the
    model's sub-modules directly (MLM runs the encoder, then the head on the
    masked rows only), which would bypass the wrapper's forward hooks on the
    model (DDP's gradient-sync bookkeeping, FSDP's parameter gathering).
    Its state_dict keys carry a ``model.`` prefix; save ``.model``'s.
    """

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict) -> dict[str, LossTerm]:
        return self.objective.loss_terms(self.model, batch)
