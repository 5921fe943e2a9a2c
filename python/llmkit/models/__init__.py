"""llmkit.models: transformer families on llmkit's attention kernels.

One file a family: :class:`GPT` (GPT-2 and Llama-style decoders, gpt.py),
:class:`BERT` / RoBERTa and their heads (bert.py), :class:`T5`
(encoder-decoder with relative position bias, t5.py), :class:`Longformer`
(longformer.py). Every family loads and writes Hugging Face checkpoints with
transformers' method names and one signature (models/hf_io.py)::

    Family.from_pretrained(path_or_hf_model, dtype=None, device=None, **config_overrides)  # eval mode
    model.save_pretrained(directory, tokenizer=None, safe_serialization=True, max_shard_size="50GB")

(``from_hf`` / ``to_hf`` are the same methods), with identical logits;
``llmkit models list`` prints the presets with their parameter counts.
"""

from .bert import (BERT, BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
                   BertForTokenClassification)
from .common import ModelOutput
from .gpt import GPT, GPTConfig, KVCache
from .longformer import Longformer, LongformerConfig, LongformerForMaskedLM
from .t5 import T5, T5Config

__all__ = ["GPT", "GPTConfig", "KVCache", "ModelOutput", "BERT", "BertConfig", "BertForMaskedLM",
           "BertForPreTraining", "BertForSequenceClassification", "BertForTokenClassification",
           "Longformer", "LongformerConfig", "LongformerForMaskedLM", "T5", "T5Config"]
