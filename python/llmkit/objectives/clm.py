"""Causal language modelling (GPT): predict every next token of packed blocks.

Blocks of seq_len tokens are cut from the corpus stream with EOS after
every document (GPT-2's <|endoftext|> between documents), so no padding is
ever needed and the model learns where documents end. Attention is not
reset at document boundaries (as GPT-2 / nanoGPT); the EOS tells the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import LossTerm, Objective, check_not_empty, check_seq_len, to_model_device
from .blocks import PackedBlocks


class CausalLM(Objective):
    name = "clm"
    model_family = "gpt"

    def __init__(self, tokenizer, seed: int = 0):
        # No randomness in the batch itself; seed is kept for a uniform interface.
        super().__init__(tokenizer, seed=seed)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("causal LM needs the tokenizer's eos_token (the separator between documents); "
                             "set one, e.g. Tokenizer(backend, eos_token='</s>')")

    def examples(self, shards, seq_len: int) -> PackedBlocks:
        seq_len = check_seq_len(seq_len, 2, "causal LM (a token and its successor)")
        return check_not_empty(PackedBlocks(shards, seq_len, self.eos_id), shards, seq_len, "causal LM")

    def collate(self, examples: list, sample_ids: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        self._check_batch_args(examples, sample_ids, epoch)
        lengths = {len(e) for e in examples}
        if len(lengths) != 1:
            raise ValueError(f"causal LM blocks must all have one length, got lengths {sorted(lengths)}")
        ids = torch.from_numpy(np.stack([np.asarray(e, dtype=np.int64) for e in examples]))
        # transformers' convention: labels = input_ids, the model shifts them.
        return {"input_ids": ids, "labels": ids.clone()}

    def target_counts(self, batch: dict) -> dict[str, int]:
        labels = batch["labels"]
        # Position t predicts labels[t + 1]: the last position of each row has no target.
        return {"clm": int((labels[:, 1:] != -100).sum())}

    def loss_terms(self, model, batch: dict) -> dict[str, LossTerm]:
        count = self.target_counts(batch)["clm"]
        batch = to_model_device(batch, model)
        out = model(batch["input_ids"], labels=batch["labels"], logits_to_keep="none")
        # The model returns the mean over the targets; the trainer wants the sum.
        loss = out.loss.float() * count if count else out.loss.float().nan_to_num() * 0.0
        return {"clm": LossTerm(sum=loss, correct=None)}
