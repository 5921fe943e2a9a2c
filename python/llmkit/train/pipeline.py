"""From a text source and a model preset to a trained model: the steps
``llmkit pretrain`` runs, as functions the demo and the benchmark share.

tokenizer (trained on the corpus once and cached, or given) -> token shards
(cached) -> model from the preset, sized to the tokenizer -> objective ->
:class:`Trainer` -> Hugging Face export with the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .config import TrainConfig

# Which objective trains which family, and the tokenizer each family gets by default.
FAMILY_OBJECTIVE = {"gpt": "clm", "bert": "mlm", "t5": "span"}
_FAMILY_OF = {v: k for k, v in FAMILY_OBJECTIVE.items()}
T5_SENTINELS = 100


def model_family(preset: str) -> str:
    from llmkit.models.bert import BertConfig
    from llmkit.models.gpt import GPTConfig
    from llmkit.models.t5 import T5Config

    for family, config_class in (("gpt", GPTConfig), ("bert", BertConfig), ("t5", T5Config)):
        if preset in config_class.PRESETS:
            return family
    known = sorted(GPTConfig.PRESETS) + sorted(BertConfig.PRESETS) + sorted(T5Config.PRESETS)
    raise ValueError(f"unknown model preset {preset!r}; choose from {known}")


def preset_vocab_size(preset: str) -> int:
    family = model_family(preset)
    return int(_preset_config(family, preset).vocab_size)


def _preset_config(family: str, preset: str, **overrides):
    from llmkit.models.bert import BertConfig
    from llmkit.models.gpt import GPTConfig
    from llmkit.models.t5 import T5Config

    config_class = {"gpt": GPTConfig, "bert": BertConfig, "t5": T5Config}[family]
    return config_class.from_preset(preset, **overrides)


def default_tokenizer_spec(family: str, preset: str, vocab_size: int | None) -> dict:
    """GPT: byte-level BPE; BERT: lowercase WordPiece (RoBERTa presets: BPE);
    T5: BPE with 100 <extra_id_N> sentinels."""
    kind = "bpe"
    sentinels = 0
    if family == "bert":
        from llmkit.models.bert import BertConfig

        kind = "wordpiece" if BertConfig.PRESETS[preset].get("model_type", "bert") == "bert" else "bpe"
    if family == "t5":
        sentinels = T5_SENTINELS
    return {"kind": kind, "vocab_size": int(vocab_size or preset_vocab_size(preset)), "sentinels": sentinels}


def cache_root() -> Path:
    return Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit"))


def _source_key(source) -> str:
    from llmkit.data.sources import source_identity  # paths, sizes, mtimes: what prepare_corpus keys on

    return json.dumps(source_identity(source), sort_keys=True, default=str)


def get_tokenizer(source, spec: dict, tokenizer_path=None, max_documents=None, progress=True):
    """The given tokenizer, or one trained on `source` with `spec` (cached)."""
    from llmkit.data import train_tokenizer
    from llmkit.data.tokenizer import Tokenizer

    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path)
    key = hashlib.sha256(json.dumps([_source_key(source), spec, max_documents], sort_keys=True).encode())
    directory = cache_root() / "tokenizers" / key.hexdigest()[:16]
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(directory)
    kwargs = dict(vocab_size=spec["vocab_size"], kind=spec["kind"], sentinels=spec["sentinels"], progress=progress)
    if max_documents is not None:
        kwargs["max_documents"] = max_documents
    tokenizer = train_tokenizer(source, **kwargs)
    tokenizer.save(directory)
    return tokenizer


def get_corpus(source, tokenizer, max_documents=None, progress=True):
    """A prepared corpus directory (with meta.json) as is, else `source`
    tokenized with `tokenizer` into the cache."""
    from llmkit.data import TokenizedCorpus, prepare_corpus

    if source is not None and (Path(source) / "meta.json").is_file():
        return TokenizedCorpus.open(source)
    kwargs = dict(progress=progress)
    if max_documents is not None:
        kwargs["max_documents"] = max_documents
    return prepare_corpus(source, tokenizer, **kwargs)


def build_model(family: str, preset: str, tokenizer, seq_len: int, nsp: bool = False, **overrides):
    """The preset's model with the tokenizer's vocabulary and special ids."""
    vocab = tokenizer.vocab_size
    if family == "gpt":
        from llmkit.models.gpt import GPT

        config = _preset_config(family, preset, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **overrides)
        if config.position == "learned" and seq_len > config.block_size:
            raise ValueError(f"seq_len {seq_len} is longer than {preset}'s block_size {config.block_size}")
        return GPT(config)
    if family == "bert":
        from llmkit.models.bert import BertForMaskedLM, BertForPreTraining

        config = _preset_config(family, preset, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, **overrides)
        offset = config.pad_token_id + 1 if config.model_type == "roberta" else 0
        if seq_len + offset > config.max_position_embeddings:
            raise ValueError(f"seq_len {seq_len} is longer than {preset}'s max_position_embeddings "
                             f"{config.max_position_embeddings}")
        if nsp and config.model_type != "bert":
            raise ValueError("next-sentence prediction is BERT's (RoBERTa dropped it): use a bert preset")
        return (BertForPreTraining if nsp else BertForMaskedLM)(config)
    from llmkit.models.t5 import T5

    pad = tokenizer.pad_token_id
    config = _preset_config(family, preset, vocab_size=vocab, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                            decoder_start_token_id=pad, **overrides)
    return T5(config)


def pretrain(model: str, objective: str | None = None, data=None, config: TrainConfig | None = None, *,
             tokenizer=None, vocab_size: int | None = None, objective_options: dict | None = None,
             model_overrides: dict | None = None, max_documents: int | None = None, resume=False,
             export: bool = True) -> dict:
    """Train preset `model` with `objective` ("clm" | "mlm" | "span"; default
    the family's) on `data` (a text file, folder, JSONL, a prepared corpus
    directory; None: the shipped English corpus). Returns {"trainer",
    "tokenizer", "result", "model_dir"}."""
    from llmkit.objectives import get_objective

    from .trainer import Trainer

    config = config or TrainConfig()
    family = model_family(model)
    objective = objective or FAMILY_OBJECTIVE[family]
    if objective not in ("clm", "mlm", "span"):
        raise ValueError(f"objective must be clm, mlm or span, got {objective!r}")
    if FAMILY_OBJECTIVE[family] != objective:
        raise ValueError(f"objective {objective!r} trains {_FAMILY_OF[objective]} models; "
                         f"{model!r} is a {family} preset (its objective is {FAMILY_OBJECTIVE[family]!r})")
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"no data at {data}")
    from . import distributed
    from .trainer import resolve_device

    # Under torchrun, rank 0 trains the tokenizer and tokenizes the corpus into
    # the cache while the other ranks wait; then they read what it wrote.
    dist_state = distributed.setup(config.distributed, resolve_device(config.device))
    if not dist_state.is_main:
        distributed.barrier(dist_state)
    progress = config.progress and dist_state.is_main
    if data is not None and (Path(data) / "meta.json").is_file():
        corpus = get_corpus(data, None)
        tok = corpus.tokenizer
    else:
        spec = default_tokenizer_spec(family, model, vocab_size)
        tok = get_tokenizer(data, spec, tokenizer, max_documents=max_documents, progress=progress)
        corpus = get_corpus(data, tok, max_documents=max_documents, progress=progress)
    if dist_state.is_main:
        distributed.barrier(dist_state)
    options = dict(objective_options or {})
    options.setdefault("seed", config.seed)
    obj = get_objective(objective, tok, **options)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = build_model(family, model, tok, config.seq_len, nsp=bool(options.get("nsp")), **(model_overrides or {}))
    config.extra.setdefault("preset", model)
    trainer = Trainer(net, obj, corpus.train, config, eval_data=corpus.val, tokenizer=tok)
    result = trainer.train(resume=resume)
    model_dir = trainer.export(Path(config.out_dir) / "model") if export else None
    return {"trainer": trainer, "tokenizer": tok, "result": result, "model_dir": model_dir, "corpus": corpus}

