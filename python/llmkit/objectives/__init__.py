"""Pretraining objectives: each a collator plus a loss (see base.Objective).

    objective = get_objective("mlm", tokenizer, whole_word=True)
    examples = objective.examples(corpus.train, seq_len=128)
    batch = objective.collate([examples[i] for i in ids], ids, epoch)
    terms = objective.loss_terms(model, batch)   # {"mlm": LossTerm(sum, correct)}
    # under DDP / FSDP wrap ObjectiveModule(model, objective) instead and call it on the batch

``clm`` (GPT causal LM), ``mlm`` (BERT / RoBERTa masked LM, optional NSP),
``span`` (T5 span corruption).
"""

from __future__ import annotations

import inspect

from .base import IGNORE_INDEX, ExampleSet, LossTerm, Objective, ObjectiveModule
from .blocks import PackedBlocks
from .clm import CausalLM
from .mlm import MaskedLM, SentencePairs
from .span import (SpanCorruption, input_and_target_lengths, random_spans_noise_mask,
                   reconstruct)

OBJECTIVES = {"clm": CausalLM, "mlm": MaskedLM, "span": SpanCorruption}


def get_objective(name: str, tokenizer, **options) -> Objective:
    """The objective ``name`` ("clm", "mlm" or "span") for ``tokenizer``; options
    are the objective class's keyword arguments (e.g. mlm_probability, nsp)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tokenizer")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"objective {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are {accepted}")
    return cls(tokenizer, **options)


__all__ = ["get_objective", "OBJECTIVES", "Objective", "ObjectiveModule", "LossTerm", "ExampleSet", "IGNORE_INDEX",
           "PackedBlocks",
           "CausalLM", "MaskedLM", "SentencePairs", "SpanCorruption", "reconstruct", "random_spans_noise_mask",
           "input_and_target_lengths"]
