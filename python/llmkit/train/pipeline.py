"""From a text source and a model preset to a trained model: the steps
``llmkit pretrain`` runs, as functions the demo and the benchmark share.

tokenizer (trained on the corpus once and cached, or given) -> token shards
(cached) -> model from the preset, sized to the tokenizer -> objective ->
:class:`Trainer` -> Hugging Face export with the tokenizer.

The tokenizer cache (``$LLMKIT_CACHE/tokenizers/KEY/``, default
``~/.cache/llmkit``) holds one directory per (source files, spec, max_documents):
tokenizer.json, tokenizer_config.json and cache.json, a manifest naming the
key and the sha256 of tokenizer.json, all written as one atomic directory
under a build lock (see ``llmkit.data._cache``). An entry that does not
check out (a manifest missing or naming another key, a tokenizer that does
not load or whose hash differs: an older llmkit's entry, a disk error) is
trained again, with a warning, instead of failing every later run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from llmkit.utils import atomic_directory, get_logger, write_json

from .config import TrainConfig

_log = get_logger(__name__)
TOKENIZER_CACHE_FORMAT = "llmkit-tokenizer-cache"

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
    from llmkit.data._cache import build_lock, remove_leftovers
    from llmkit.data.tokenizer import Tokenizer, check_vocab_size

    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path)
    check_vocab_size(spec["vocab_size"])  # before reading the corpus
    key = hashlib.sha256(json.dumps([_source_key(source), spec, max_documents], sort_keys=True).encode()).hexdigest()
    directory = cache_root() / "tokenizers" / key[:16]
    tokenizer = _cached_tokenizer(directory, key)
    if tokenizer is not None:
        return tokenizer
    with build_lock(directory):
        tokenizer = _cached_tokenizer(directory, key, warn=False)  # built by another process meanwhile
        if tokenizer is not None:
            return tokenizer
        kwargs = dict(vocab_size=spec["vocab_size"], kind=spec["kind"], sentinels=spec["sentinels"],
                      progress=progress)
        if max_documents is not None:
            kwargs["max_documents"] = max_documents
        tokenizer = train_tokenizer(source, **kwargs)
        remove_leftovers(directory)
        with atomic_directory(directory, keep_existing=False) as tmp:
            tokenizer.save(tmp)
            digest = hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
            write_json(tmp / "cache.json", {"format": TOKENIZER_CACHE_FORMAT, "key": key, "spec": spec,
                                            "max_documents": max_documents, "tokenizer_sha256": digest})
    return tokenizer


def _cached_tokenizer(directory: Path, key: str, warn: bool = True):
    """The tokenizer cached in `directory` if the entry checks out, else None (a warning if it exists)."""
    from llmkit.data.tokenizer import Tokenizer

    if not os.path.lexists(directory):
        return None
    try:
        manifest = json.loads((directory / "cache.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != TOKENIZER_CACHE_FORMAT:
            raise ValueError("cache.json is not a tokenizer cache manifest")
        if manifest.get("key") != key:
            raise ValueError("it was trained for other data or settings")
        digest = hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
        if digest != manifest.get("tokenizer_sha256"):
            raise ValueError("tokenizer.json does not match the sha256 in cache.json")
        return Tokenizer.from_file(directory)
    except (OSError, ValueError) as err:
        if warn:
            _log.warning("the cached tokenizer %s is unusable (%s): training it again", directory, err)
        return None


def is_prepared_corpus(source) -> bool:
    """Whether `source` is a directory written by tokenize_corpus / `llmkit corpus prepare`."""
    return source is not None and (Path(source).expanduser() / "meta.json").is_file()


def get_corpus(source, tokenizer, max_documents=None, progress=True):
    """A prepared corpus directory (with meta.json) as is, else `source`
    tokenized with `tokenizer` into the cache."""
    from llmkit.data import TokenizedCorpus, prepare_corpus

    if is_prepared_corpus(source):
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
    if data is not None and not Path(data).expanduser().exists():
        raise FileNotFoundError(f"no data at {data}")
    prepared = is_prepared_corpus(data)
    if prepared and (tokenizer is not None or vocab_size is not None or max_documents is not None):
        raise ValueError(f"{data} is a prepared corpus, tokenized with its own tokenizer: drop --tokenizer / "
                         f"--vocab-size / --max-documents (or pass the raw text as --data)")
    if vocab_size is not None:
        from llmkit.data.tokenizer import check_vocab_size

        check_vocab_size(vocab_size)
    from . import checkpoint, distributed
    from .trainer import check_output_dir, resolve_device

    # Before the tokenizer and the corpus (minutes on a big corpus): is the output directory usable?
    check_output_dir(config.out_dir, resume, config.overwrite)
    if resume is True and checkpoint.latest(Path(config.out_dir) / "checkpoints") is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {Path(config.out_dir) / 'checkpoints'} "
                                f"(run without --resume to start training)")

    # Under torchrun, rank 0 trains the tokenizer and tokenizes the corpus into
    # the cache while the other ranks wait; then they read what it wrote.
    dist_state = distributed.setup(config.distributed, resolve_device(config.device))
    if not dist_state.is_main:
        distributed.barrier(dist_state)
    progress = config.progress and dist_state.is_main
    if prepared:
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

