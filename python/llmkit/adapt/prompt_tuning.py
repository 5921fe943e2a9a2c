"""Prompt tuning: trainable soft prompts in front of a frozen model.

Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning") learns ``num_virtual_tokens`` embedding vectors that are
prepended to the embedded input of a frozen model; only those vectors train.

This module follows PEFT's implementation (``peft.tuners.prompt_tuning`` and
``PeftModelForCausalLM`` / ``PeftModelForSequenceClassification`` /
``PeftModelForFeatureExtraction``) so that, on identical weights, logits,
losses and saved files are the same:

* ``SoftPrompt.embedding`` is an ``nn.Embedding(num_virtual_tokens, dim)``
  (PEFT's ``PromptEmbedding.embedding``), kept in float32 and cast to the
  input embeddings' dtype in ``forward``.
* Initialisation (PEFT's ``PromptTuningInit``): giving ``init_text`` means
  ``text`` (with a tokenizer), giving none means ``random``; an ``init`` that
  contradicts the other arguments (``"random"`` with an ``init_text``,
  ``"text"`` without one or without a tokenizer, a tokenizer with nothing to
  tokenize) is an error, never a silent fallback. ``random`` is ``nn.Embedding``'s
  N(0, 1); ``text`` tokenizes the text *with* the tokenizer's special tokens
  (``tokenizer(text)["input_ids"]``), cuts the ids to ``num_virtual_tokens`` or
  repeats the whole list and cuts it, and copies the model's word embeddings of
  those ids; ``sample_vocab`` copies the embeddings of uniformly sampled
  vocabulary ids. Random draws come in PEFT's order (the embedding's N(0, 1)
  first, then the sampled ids), so a seed gives the same prompt as in PEFT.
* Forward: the prompt is prepended to ``inputs_embeds``; the attention mask
  gets ones in front; for causal LMs the labels get -100 in front (the virtual
  positions are never predicted) and ``token_type_ids`` are dropped; for
  sequence classification ``token_type_ids`` get zeros in front and the labels
  stay as they are. ``position_ids`` are ignored with a warning, as in PEFT.
* Files (``save_prompt`` / ``load_prompt``): PEFT's ``adapter_config.json``
  (``peft_type: "PROMPT_TUNING"``) and ``adapter_model.safetensors`` with the
  tensor ``prompt_embeddings`` of shape (num_virtual_tokens, dim); for
  sequence classification the head (PEFT's ``modules_to_save``: children
  named ``classifier`` / ``score``) is stored too, as
  ``base_model.<module path>.<param>``. ``PeftModel.from_pretrained`` loads
  our directories and ``load_prompt`` loads PEFT's. A save replaces the
  directory as a whole (:func:`llmkit.utils.atomic_directory`): whenever the
  process dies, the directory holds the old prompt or the new one, never new
  weights beside an old config.
* ``get_peft_model(model, PromptTuningConfig(...))``: PEFT's config (ours,
  :class:`llmkit.adapt.PromptTuningConfig`, or peft's) works as PEFT's does,
  including PEFT's training of a SEQ_CLS head. ``with model.disable_adapter():``
  runs the base model without the prompt.

What the wrapped model must offer (Hugging Face models do; llmkit's own models
need only this): ``get_input_embeddings()`` returning a module with a
``(vocab, dim)`` ``weight`` that maps ids to embeddings, and a ``forward`` that
accepts ``inputs_embeds=`` and ``attention_mask=`` (and ``labels=`` when you
pass labels). ``PromptTunedModel.generate`` additionally needs the model's
``generate(inputs_embeds=..., attention_mask=...)``.

Encoder-decoder models (PEFT's SEQ_2_SEQ_LM, two transformer submodules) are
not supported.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from ..utils import atomic_directory, recover_directory

__all__ = [
    "SoftPrompt",
    "PromptTunedModel",
    "apply_prompt_tuning",
    "save_prompt",
    "load_prompt",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

# PEFT's file names and tensor key.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False)
PROMPT_KEY = "prompt_embeddings"
HEAD_KEY_PREFIX = "base_model."

INITS = {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
# PeftModelForSequenceClassification trains and saves these children (modules_to_save).
CLASSIFIER_MODULE_NAMES = ("classifier", "score")


def _normalize_init(init: str) -> str:
    """Accept ``"text"`` as well as PEFT's ``PromptTuningInit.TEXT`` / ``"TEXT"``."""
    key = str(getattr(init, "value", init)).lower()
    if key not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)} (or PEFT's {sorted(INITS.values())}), got {init!r}")
    return key


def resolve_init(init: str | None, init_text: str | None, tokenizer: Any) -> str:
    """The init the arguments ask for, or ValueError when they are incomplete or contradict.

    ``init=None``: ``"text"`` when `init_text` is given, else ``"random"``. A
    tokenizer with no `init_text`, an `init_text` or tokenizer with ``"random"``
    / ``"sample_vocab"`` (which would ignore them), and ``"text"`` without both
    are errors: a prompt is never silently initialised otherwise than asked.
    """
    if init_text is not None and not isinstance(init_text, str):
        raise TypeError(f"init_text must be a str, got {type(init_text).__name__}")
    if init is None:
        if init_text is None and tokenizer is not None:
            raise ValueError("a tokenizer was given without init_text: TEXT init needs the text to embed "
                             "(init_text=...); for a random prompt, drop the tokenizer")
        init = "text" if init_text is not None else "random"
    init = _normalize_init(init)
    if init == "text":
        missing = [name for name, v in (("init_text", init_text), ("tokenizer", tokenizer)) if v is None]
        if missing:
            raise ValueError(f"init='text' needs init_text and tokenizer; missing: {', '.join(missing)}")
    elif init_text is not None or tokenizer is not None:
        given = [name for name, v in (("init_text", init_text), ("tokenizer", tokenizer)) if v is not None]
        raise ValueError(f"init={init!r} does not use {' and '.join(given)}, which were given: contradictory "
                         "arguments. For a prompt initialised from text, pass init_text and tokenizer (and "
                         "init='text' or no init)")
    return init


def _check_num_virtual_tokens(num_virtual_tokens: int) -> int:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, numbers.Integral):
        raise TypeError(f"num_virtual_tokens must be an int, got {type(num_virtual_tokens).__name__}")
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    return int(num_virtual_tokens)


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is; a name or path through ``AutoTokenizer`` (what PEFT does)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return tokenizer


def text_init_ids(tokenizer: Any, init_text: str, num_virtual_tokens: int) -> list[int]:
    """Token ids for TEXT init, by PEFT's rule.

    ``tokenizer(init_text)["input_ids"]`` (special tokens included, as PEFT
    calls it); longer than ``num_virtual_tokens``: cut; shorter: the whole
    list repeated ``ceil(n / len)`` times, then cut.
    """
    ids = tokenizer(init_text)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"init_text {init_text!r} tokenizes to zero tokens; TEXT init needs at least one")
    if len(ids) < num_virtual_tokens:
        ids = ids * math.ceil(num_virtual_tokens / len(ids))
    return ids[:num_virtual_tokens]


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` trainable vectors of width ``dim`` (PEFT's ``PromptEmbedding``).

    Args:
        num_virtual_tokens: number of virtual tokens (>= 1).
        dim: their width, the model's input-embedding width.
        init: ``"random"`` (N(0, 1), ``nn.Embedding``'s default), ``"text"``
            (embeddings of ``init_text``'s tokens) or ``"sample_vocab"``
            (embeddings of random vocabulary ids); PEFT's upper-case names work
            too. None (default): ``"text"`` if `init_text` is given, else
            ``"random"`` (see :func:`resolve_init`).
        word_embeddings: the model's input embedding module; needed by
            ``"text"`` and ``"sample_vocab"``.
        init_text: the text for ``"text"``.
        tokenizer: for ``"text"``: a tokenizer (called as ``tokenizer(text)``)
            or a name/path for ``AutoTokenizer.from_pretrained``.

    The weight stays float32 whatever the model's dtype (PEFT autocasts
    adapter weights to float32 too); ``forward`` returns it in that dtype and
    callers cast.
    """

    def __init__(self, num_virtual_tokens: int, dim: int, init: str | None = None,
                 word_embeddings: nn.Module | None = None, init_text: str | None = None,
                 tokenizer: Any = None):
        super().__init__()
        num_virtual_tokens = _check_num_virtual_tokens(num_virtual_tokens)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        init = resolve_init(init, init_text, tokenizer)
        if init != "random" and word_embeddings is None:
            raise ValueError(f"init={init!r} copies rows of the model's word embeddings; pass word_embeddings")

        self.num_virtual_tokens = num_virtual_tokens
        self.dim = dim
        # Created first, on the CPU, in every case: PEFT draws its N(0, 1) before the
        # sampled ids, so the same seed gives the same SAMPLE_VOCAB prompt.
        self.embedding = nn.Embedding(num_virtual_tokens, dim)

        if init == "random":
            return
        weight = word_embeddings.weight
        if weight.dim() != 2 or weight.shape[1] != dim:
            raise ValueError(f"word_embeddings.weight must be (vocab, {dim}), got {tuple(weight.shape)}")
        if init == "sample_vocab":
            ids = torch.randint(0, weight.shape[0], (num_virtual_tokens,), dtype=torch.long)
        else:
            ids = torch.tensor(text_init_ids(_load_tokenizer(tokenizer), init_text, num_virtual_tokens))
            if int(ids.max()) >= weight.shape[0] or int(ids.min()) < 0:
                raise ValueError(f"init_text token ids span [{int(ids.min())}, {int(ids.max())}] but the "
                                 f"model's vocabulary has {weight.shape[0]} rows: tokenizer and model disagree")
        with torch.no_grad():
            # Through the module, as PEFT does, so scaled embeddings (e.g. Gemma's) are copied scaled.
            rows = word_embeddings(ids.to(weight.device)).detach().to(device="cpu", dtype=torch.float32)
            self.embedding.weight.copy_(rows)

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt for a batch: (batch_size, num_virtual_tokens, dim), an expanded view."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.dim}"


def _input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); prompt tuning needs the model's "
                        "input embedding module and a forward that accepts inputs_embeds=")
    emb = get()
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() must return a module with a (vocab, dim) "
                        f"weight, got {type(emb).__name__}")
    return emb


def _infer_task_type(model: nn.Module) -> str:
    """PEFT's task type from the class name of a transformers model."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; prompt tuning here supports "
                         f"decoder-only and encoder-only models ({', '.join(TASK_TYPES)})")
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("Model") and "For" not in name:
        return "FEATURE_EXTRACTION"
    raise ValueError(f"cannot tell the task of {name}; pass task_type= one of {TASK_TYPES}")


def _config_value(model: nn.Module, *keys: str) -> int | None:
    """The first of `keys` in the model's config (PEFT's fallbacks for num_layers, heads)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


def _classifier_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The head PEFT trains for SEQ_CLS: children whose name contains 'classifier' or 'score'."""
    return {name: module for name, module in model.named_children()
            if any(key in name for key in CLASSIFIER_MODULE_NAMES)}


class PromptTunedModel(nn.Module):
    """A frozen model with a trainable soft prompt in front of its input.

    Build it with :func:`apply_prompt_tuning`. ``forward`` and ``generate``
    follow PEFT's prompt-tuning ``PeftModelFor*`` classes (see the module
    docstring); attributes it does not have are looked up on the base model,
    as PEFT's ``PeftModel`` does.

    Attributes:
        base_model: the wrapped model (frozen, except a classification head when
            ``train_head``).
        soft_prompt: the :class:`SoftPrompt`.
        task_type: ``"CAUSAL_LM"``, ``"SEQ_CLS"`` or ``"FEATURE_EXTRACTION"``.
        head_names: the base model's children trained along (``train_head``).
        prompt_config: the prompt-tuning fields of PEFT's config written by
            :func:`save_prompt`.
    """

    def __init__(self, base_model: nn.Module, soft_prompt: SoftPrompt, task_type: str,
                 prompt_config: dict[str, Any], train_head: bool = False):
        super().__init__()
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self.base_model = base_model
        self.soft_prompt = soft_prompt
        self.task_type = task_type
        self.prompt_config = dict(prompt_config)
        self.head_names: list[str] = []
        self._prompt_disabled = False
        for param in base_model.parameters():
            param.requires_grad_(False)
        if train_head:
            heads = _classifier_modules(base_model)
            if task_type != "SEQ_CLS" or not heads:
                raise ValueError("train_head=True needs a sequence classifier with a 'classifier' or 'score' "
                                 f"child module (PEFT's modules_to_save); got {type(base_model).__name__} "
                                 f"with task {task_type}")
            self.head_names = sorted(heads)
            for module in heads.values():
                for param in module.parameters():
                    param.requires_grad_(True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name == "base_model":  # not yet set: don't recurse
                raise
            return getattr(self.base_model, name)

    @property
    def num_virtual_tokens(self) -> int:
        return self.soft_prompt.num_virtual_tokens

    def get_input_embeddings(self) -> nn.Module:
        return _input_embeddings(self.base_model)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the ``with`` block, ``forward`` and ``generate`` run the base
        model on the input alone, without the prompt (PEFT's
        ``disable_adapter``); restored on exit, on exceptions too."""
        before = self._prompt_disabled
        self._prompt_disabled = True
        try:
            yield
        finally:
            self._prompt_disabled = before

    def get_prompt(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The virtual tokens' embeddings for a batch, (batch_size, n, dim), in `dtype`."""
        prompt = self.soft_prompt(batch_size)
        return prompt if dtype is None else prompt.to(dtype)

    def trainable_parameters(self) -> int:
        """Number of trainable parameters (the prompt, plus the head when ``train_head``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _embed_with_prompt(self, input_ids: torch.Tensor | None,
                           inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        prompt = self.get_prompt(inputs_embeds.shape[0], inputs_embeds.dtype).to(inputs_embeds.device)
        return torch.cat((prompt, inputs_embeds), dim=1)

    def _prefix(self, tensor: torch.Tensor, value: int) -> torch.Tensor:
        """`tensor` (batch, seqlen) with `value` in front for the virtual positions."""
        pad = torch.full((tensor.shape[0], self.num_virtual_tokens), value, dtype=tensor.dtype,
                         device=tensor.device)
        return torch.cat((pad, tensor), dim=1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs: Any):
        """Run the base model on ``[prompt; embeddings of input_ids]``.

        Args:
            input_ids: (batch, seqlen) token ids (or pass ``inputs_embeds``).
            attention_mask: (batch, seqlen); ones are put in front for the prompt.
            labels: causal LM: (batch, seqlen), -100 put in front; sequence
                classification: (batch,) as is.
            **kwargs: passed to the base model; ``token_type_ids`` get zeros in
                front for sequence classification and are dropped otherwise;
                ``position_ids`` are dropped (PEFT's prompt-tuning behaviour).
        """
        if self._prompt_disabled:  # disable_adapter(): the base model, as called
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                     "inputs_embeds": inputs_embeds}
            return self.base_model(**{k: v for k, v in given.items() if v is not None}, **kwargs)
        if kwargs.get("position_ids") is not None:
            warnings.warn("position_ids are ignored with prompt tuning (as in PEFT)", stacklevel=2)
        kwargs.pop("position_ids", None)
        token_type_ids = kwargs.pop("token_type_ids", None)
        if token_type_ids is not None:
            if self.task_type == "SEQ_CLS":
                kwargs["token_type_ids"] = self._prefix(token_type_ids.long(), 0)
            else:
                warnings.warn("token_type_ids are ignored with prompt tuning for this task (as in PEFT)",
                              stacklevel=2)

        embeds = self._embed_with_prompt(input_ids, inputs_embeds)
        if attention_mask is not None:
            # PEFT concatenates a float ones tensor (torch.cat promotes); keep the caller's dtype instead.
            attention_mask = self._prefix(attention_mask, 1)
        if labels is not None:
            if self.task_type == "FEATURE_EXTRACTION":
                raise ValueError("labels are not accepted for task FEATURE_EXTRACTION")
            if self.task_type == "CAUSAL_LM":
                labels = self._prefix(labels, -100)  # virtual positions are never targets
            kwargs["labels"] = labels
        return self.base_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Generate with the prompt in front (causal LMs).

        The prompt and the embedded ``input_ids`` go to the base model's
        ``generate`` as ``inputs_embeds`` on the first step; later steps feed
        the new tokens through the KV cache. Returns ``input_ids`` followed by
        the new tokens, as PEFT does (also inside ``sequences`` when the base
        model returns a dict). ``max_length`` / ``min_length`` count
        ``input_ids`` and new tokens, never the virtual tokens (PEFT's
        meaning); ``max_new_tokens`` is the clearest.

        Positions come from the attention mask (transformers' generate
        convention), so a left-padded row generates what it would alone; PEFT
        drops position ids here, which differs from this only with padding.
        """
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"generate needs a causal LM, this prompt is for {self.task_type}")
        if not hasattr(self.base_model, "generate"):
            raise TypeError(f"{type(self.base_model).__name__} has no generate()")
        if self._prompt_disabled:  # disable_adapter(): the base model, as called
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.pop("inputs_embeds", None) is not None:
            raise ValueError("pass input_ids to generate; inputs_embeds are built here (prompt + input_ids)")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("generate needs input_ids of shape (batch, seqlen)")
        seqlen = input_ids.shape[1]
        for name in ("max_length", "min_length"):
            value = kwargs.pop(name, None)
            new_name = name.replace("_length", "_new_tokens")
            if value is not None and kwargs.get(new_name) is None:
                kwargs[new_name] = max(value - seqlen, 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self._embed_with_prompt(input_ids, None)
        out = self.base_model.generate(inputs_embeds=embeds, attention_mask=self._prefix(attention_mask, 1),
                                       **kwargs)
        # With inputs_embeds only, transformers returns only the new tokens; rows are
        # input rows repeated num_return_sequences times each (repeat_interleave order).
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prefix = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat((prefix, sequences), dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int | None = None, init_text: str | None = None,
                        tokenizer: Any = None, init: str | None = None, task_type: str | None = None,
                        train_head: bool | None = None, *, config: Any = None) -> PromptTunedModel:
    """Freeze `model` and put a trainable soft prompt in front of its input.

    The counterpart of ``get_peft_model(model, PromptTuningConfig(...))``::

        apply_prompt_tuning(model, num_virtual_tokens=20, init_text="Classify the review:", tokenizer=tokenizer)
        apply_prompt_tuning(model, config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))

    Args:
        model: a decoder-only causal LM or an encoder model (a transformers
            model, or any model with ``get_input_embeddings()`` and a forward
            taking ``inputs_embeds=``).
        num_virtual_tokens: prompt length (>= 1).
        init_text, tokenizer: TEXT init: the prompt starts as the embeddings of
            ``init_text``'s tokens (the tokenizer may be a name or path; its
            ``name_or_path`` is recorded in the saved config).
        init: ``"random"``, ``"text"`` or ``"sample_vocab"`` (PEFT's
            ``PromptTuningInit``); None: ``"text"`` when `init_text` is given,
            else ``"random"``. Contradictory or incomplete arguments raise
            ValueError (see :func:`resolve_init`).
        task_type: ``"CAUSAL_LM"``, ``"SEQ_CLS"`` or ``"FEATURE_EXTRACTION"``;
            inferred from a transformers class name when None.
        train_head: sequence classification only: also train the ``classifier``
            / ``score`` head, as PEFT's ``PeftModelForSequenceClassification``
            does (its ``modules_to_save``); the head is trained in place.
            Default: off (only the prompt trains), but with a `config` PEFT's
            behaviour (on for a SEQ_CLS model that has such a head). Either way
            :func:`save_prompt` stores the head of a sequence classifier.
        config: instead of the arguments above (but `tokenizer` and
            `train_head`), a :class:`llmkit.adapt.PromptTuningConfig`, a
            ``peft.PromptTuningConfig`` or its dict; TEXT init loads
            ``tokenizer_name_or_path`` unless `tokenizer` is given.

    Returns:
        a :class:`PromptTunedModel` on the device of the model's embeddings.
    """
    if config is not None:
        from .config import as_prompt_tuning_config

        given = [name for name, v in (("num_virtual_tokens", num_virtual_tokens), ("init_text", init_text),
                                      ("init", init), ("task_type", task_type)) if v is not None]
        if given:
            raise TypeError(f"apply_prompt_tuning: give either config or {', '.join(given)}, not both")
        cfg = as_prompt_tuning_config(config)
        if cfg.num_virtual_tokens is None:
            raise ValueError("the PromptTuningConfig has no num_virtual_tokens")
        num_virtual_tokens, task_type, init = cfg.num_virtual_tokens, cfg.task_type, cfg.prompt_tuning_init
        if init == "TEXT":
            init_text = cfg.prompt_tuning_init_text
            if tokenizer is None:
                tokenizer = cfg.tokenizer_name_or_path
        if train_head is None and (task_type or _infer_task_type(model)) == "SEQ_CLS":
            train_head = bool(_classifier_modules(model))  # PeftModelForSequenceClassification's modules_to_save
    init = resolve_init(init, init_text, tokenizer)
    word_embeddings = _input_embeddings(model)
    task_type = _infer_task_type(model) if task_type is None else str(getattr(task_type, "value", task_type))
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    tokenizer_name = None
    if init == "text":
        tokenizer = _load_tokenizer(tokenizer)
        tokenizer_name = getattr(tokenizer, "name_or_path", None) or None
    dim = word_embeddings.weight.shape[1]
    soft_prompt = SoftPrompt(num_virtual_tokens, dim, init=init, word_embeddings=word_embeddings,
                             init_text=init_text, tokenizer=tokenizer)
    soft_prompt.to(word_embeddings.weight.device)
    prompt_config = {
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": _config_value(model, "num_attention_heads", "n_head", "num_heads",
                                             "encoder_attention_heads"),
        "num_layers": _config_value(model, "num_hidden_layers", "num_layers", "n_layer"),
        "prompt_tuning_init": INITS[init],
        "prompt_tuning_init_text": init_text if init == "text" else None,
        "tokenizer_name_or_path": tokenizer_name,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
    }
    return PromptTunedModel(model, soft_prompt, task_type, prompt_config, train_head=bool(train_head))


def save_prompt(model: PromptTunedModel, directory: str | os.PathLike) -> None:
    """Save the prompt in PEFT's prompt-tuning format (what ``save_pretrained`` writes).

    ``adapter_model.safetensors`` holds ``prompt_embeddings`` (float32,
    (num_virtual_tokens, dim), metadata ``{"format": "pt"}``) and, for
    sequence classification, the ``classifier`` / ``score`` head as
    ``base_model.<name>.<param>`` (trained or not: PEFT always writes it and
    its loader requires it);
    ``adapter_config.json`` holds PEFT's ``PromptTuningConfig`` fields with
    ``inference_mode: true``. The directory is replaced as a whole
    (:func:`llmkit.utils.atomic_directory`, created if missing; the user's
    other files in it are kept): an interrupted save leaves the previous
    prompt, both files, untouched.

    PEFT refuses a TEXT config without ``tokenizer_name_or_path``; when the
    tokenizer had no name (built in memory) the config says ``RANDOM`` and
    keeps ``prompt_tuning_init_text``. The init only matters before training.
    """
    from safetensors.torch import save as safetensors_save

    if not isinstance(model, PromptTunedModel):
        raise TypeError(f"save_prompt needs a PromptTunedModel (from apply_prompt_tuning), "
                        f"got {type(model).__name__}")
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"{directory} is a file; save_prompt needs a directory")

    tensors = {PROMPT_KEY: model.soft_prompt.embedding.weight.detach().to("cpu", torch.float32).contiguous()}
    # PEFT saves the SEQ_CLS head whether trained or not, and its loader fails without it.
    heads = sorted(_classifier_modules(model.base_model)) if model.task_type == "SEQ_CLS" else []
    for name in heads:
        for key, value in model.base_model.get_submodule(name).state_dict().items():
            tensors[f"{HEAD_KEY_PREFIX}{name}.{key}"] = value.detach().to("cpu").contiguous().clone()

    config = dict(model.prompt_config)
    if config["prompt_tuning_init"] == "TEXT" and not config.get("tokenizer_name_or_path"):
        config["prompt_tuning_init"] = "RANDOM"
    config.update({
        "peft_type": "PROMPT_TUNING",
        "task_type": model.task_type,
        "inference_mode": True,
        "auto_mapping": None,
        "revision": None,
        "tokenizer_kwargs": None,
        # PEFT lists the head names for every SEQ_CLS prompt, trained or not.
        "modules_to_save": list(CLASSIFIER_MODULE_NAMES) if model.task_type == "SEQ_CLS" else None,
    })
    blob = safetensors_save(tensors, metadata={"format": "pt"})
    text = json.dumps(dict(sorted(config.items())), indent=2) + "\n"
    with atomic_directory(directory, discard=(LEGACY_WEIGHTS_NAME,)) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")


def _read_prompt_dir(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    recover_directory(directory)  # a save killed mid-way (two-rename fallback) is put back first
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"prompt directory {directory} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: not a PEFT adapter directory")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise ValueError(f"{config_path} has peft_type {peft_type!r}; load_prompt reads 'PROMPT_TUNING' adapters")
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    legacy_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(weights_path):
        from safetensors.torch import load_file

        tensors = load_file(weights_path)
    elif os.path.isfile(legacy_path):
        tensors = torch.load(legacy_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{weights_path} is missing (nor is there {LEGACY_WEIGHTS_NAME})")
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{directory}: the adapter weights have no {PROMPT_KEY!r} tensor "
                         f"(keys: {sorted(tensors)})")
    return config, tensors


def load_prompt(model: nn.Module, directory: str | os.PathLike) -> PromptTunedModel:
    """Load a prompt saved by :func:`save_prompt` or PEFT's ``save_pretrained``.

    Args:
        model: a :class:`PromptTunedModel` (its prompt is overwritten; shapes
            must match) or a bare model (wrapped with the file's
            num_virtual_tokens and task type).
        directory: the adapter directory.

    Head weights in the file (``base_model.<name>.<param>``, a SEQ_CLS head
    trained by PEFT) are copied into the base model's head in place. The
    loaded prompt is trainable.

    Returns:
        the :class:`PromptTunedModel`.

    Raises:
        FileNotFoundError: no directory, config or weights.
        ValueError: not a PROMPT_TUNING adapter, an encoder-decoder prompt,
            shapes that do not match the model's (both are named), or a task
            type other than the wrapper's.
    """
    directory = os.fspath(directory)
    config, tensors = _read_prompt_dir(directory)
    weight = tensors[PROMPT_KEY]
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ValueError(f"{directory} holds a prompt for {submodules} transformer submodules (encoder-decoder); "
                         "only decoder-only and encoder-only models are supported")
    n_file, dim_file = config.get("num_virtual_tokens"), config.get("token_dim")
    if weight.dim() != 2 or (n_file is not None and weight.shape[0] != n_file) or \
            (dim_file is not None and weight.shape[1] != dim_file):
        raise ValueError(f"{directory}: {PROMPT_KEY} has shape {tuple(weight.shape)} but the config says "
                         f"(num_virtual_tokens, token_dim) = ({n_file}, {dim_file})")
    task_file = config.get("task_type")
    if task_file is not None and task_file not in TASK_TYPES:
        raise ValueError(f"{directory} holds a prompt for task {task_file!r}; supported: {TASK_TYPES}")

    if isinstance(model, PromptTunedModel):
        wrapped = model
        if task_file is not None and task_file != wrapped.task_type:
            raise ValueError(f"{directory} holds a {task_file} prompt; the model is wrapped for {wrapped.task_type}")
    else:
        dim_model = _input_embeddings(model).weight.shape[1]
        if weight.shape[1] != dim_model:
            raise ValueError(f"prompt in {directory} has shape (num_virtual_tokens, dim) = {tuple(weight.shape)}; "
                             f"the model's input embeddings are {dim_model} wide")
        wrapped = apply_prompt_tuning(model, int(weight.shape[0]), task_type=task_file)
        for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                    "base_model_name_or_path"):
            if key in config:
                wrapped.prompt_config[key] = config[key]

    target = wrapped.soft_prompt.embedding.weight
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(f"prompt in {directory} has shape (num_virtual_tokens, dim) = {tuple(weight.shape)}; "
                         f"the model's prompt is {tuple(target.shape)}")

    head = {k[len(HEAD_KEY_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_KEY_PREFIX)}
    other = sorted(k for k in tensors if k != PROMPT_KEY and not k.startswith(HEAD_KEY_PREFIX))
    if other:
        raise ValueError(f"{directory}: unexpected tensors {other} in a prompt-tuning adapter")
    if head:
        try:
            result = wrapped.base_model.load_state_dict(head, strict=False)
        except RuntimeError as exc:  # size mismatch
            raise ValueError(f"{directory}: head weights do not fit the model: {exc}") from None
        if result.unexpected_keys:
            raise ValueError(f"{directory}: head weights {sorted(result.unexpected_keys)} name no parameter "
                             f"of {type(wrapped.base_model).__name__}")
    with torch.no_grad():
        target.copy_(weight.to(target.dtype))
    return wrapped
