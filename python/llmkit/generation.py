"""Text generation with a preallocated KV cache: ``llmkit.generate``.

Prompts of different lengths are never padded: they are packed back to back,
the prefill is one padding-free forward, and every decode step sends one new
token per unfinished sequence through the model; attention reads each
sequence's cache slot through ``flash_attention_varlen`` (see
:class:`llmkit.models.gpt.KVCache`). Finished sequences drop out of the
batch instead of being computed and thrown away.

Decoding follows transformers' ``generate``: repetition penalty (CTRL's
divide-positive / multiply-negative rule), then temperature, top-k and top-p
(nucleus) on the logits; greedy is argmax, sampling draws from the softmax.
Greedy decoding gives transformers' tokens, token for token, on the same
weights.

Text prompts are encoded as a causal LM's generation needs them: the text
alone, never an end-of-sequence token after it (the model would start a new
document and ignore the prompt), with the BOS token in front only where the
tokenizer asks for one: a post-processor that puts BOS before the text
(Llama's ``<s> $A`` template in tokenizer.json, which is what transformers 5
follows), or ``add_bos_token=True`` on a transformers tokenizer. An encoder's
template that wraps the text (``<s> A </s>`` with ``<s>`` the CLS token,
``[CLS] A [SEP]``: llmkit's trained tokenizers) adds nothing: a GPT trained on llmkit's packed
``doc </s> doc </s>`` stream continues the text. Prompt ids thus equal
transformers' ``tokenizer(prompt)`` for GPT-2 and Llama tokenizers.

Every sampling argument is checked (finite, in range) before anything runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .models.gpt import GPT, KVCache
from .utils import progress_bar


@dataclass
class GenerationOutput:
    """Result of :func:`generate`, one entry per prompt.

    sequences: the generated token ids (prompt excluded, EOS included when hit);
    texts: their decoded text when a tokenizer was given (cut after a stop string);
    finish_reasons: "eos", "stop_string" or "length";
    tokens_per_second: generated tokens / wall time (prefill included);
    time_to_first_token: seconds until the first token of every sequence.
    """

    sequences: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    prompt_lengths: list[int]
    new_tokens: int
    seconds: float
    time_to_first_token: float
    tokens_per_second: float = field(init=False)

    def __post_init__(self):
        self.tokens_per_second = self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class TokenEvent:
    """One generated token, as :func:`stream` yields them.

    index: which prompt; token_id; text: the new text this token completes
    (may be "" while a multi-byte character is unfinished; needs a
    tokenizer); finish_reason: set on a sequence's last token.
    """

    index: int
    token_id: int
    text: str | None = None
    finish_reason: str | None = None


def generate(model: GPT, prompts, tokenizer=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
             attention_mask: torch.Tensor | None = None, seed: int | None = None,
             progress: bool = False) -> GenerationOutput:
    """Generate continuations of `prompts` with `model` (a :class:`llmkit.models.GPT`).

    Args:
        prompts: a str or list of str (needs `tokenizer`), a list of token
            ids, a list of such lists (lengths may differ), or a (batch,
            seqlen) tensor with an optional `attention_mask` (left or right
            padding is removed).
        tokenizer: a :class:`llmkit.data.tokenizer.Tokenizer` (or anything with
            ``encode`` / ``decode``) for str prompts, texts and stop strings.
            Text is encoded without an EOS and with a BOS only where the
            tokenizer asks for one (see the module docstring).
        max_new_tokens: at most this many tokens per prompt (an int >= 0).
        do_sample: sample (with temperature / top_k / top_p) instead of greedy.
        temperature: finite, > 0 (used when sampling).
        top_k: int >= 0 (0: off). top_p: in (0, 1] (1: off).
        repetition_penalty: finite, > 0; > 1 discourages tokens already in the sequence.
        eos_token_id: id(s) that end a sequence; default the model's / tokenizer's EOS.
        stop_strings: end a sequence once its generated text contains one (needs a tokenizer).
        seed: seeds the sampler (reproducible sampling).
        progress: a progress bar of decode steps (llmkit.utils.progress_bar: on stderr,
            only on a terminal).
    """
    start = time.perf_counter()
    plan = _Plan(model, prompts, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p,
                 repetition_penalty, eos_token_id, stop_strings, attention_mask, seed)
    batch = len(plan.prompt_ids)
    sequences = [[] for _ in range(batch)]
    texts = [""] * batch if tokenizer is not None else None
    reasons = ["length"] * batch
    first_token_time = None
    bar = progress_bar(total=plan.max_new_tokens, desc="generate", unit="step", disable=not progress)
    for event in _decode(plan, on_step=bar.update):
        if first_token_time is None:
            first_token_time = time.perf_counter() - start
        sequences[event.index].append(event.token_id)
        if texts is not None:
            texts[event.index] += event.text
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    bar.close()
    seconds = time.perf_counter() - start
    return GenerationOutput(sequences=sequences, texts=texts, finish_reasons=reasons,
                            prompt_lengths=[len(p) for p in plan.prompt_ids],
                            new_tokens=sum(len(s) for s in sequences), seconds=seconds,
                            time_to_first_token=first_token_time or seconds)


def stream(model: GPT, prompts, tokenizer=None, max_new_tokens: int = 32, do_sample: bool = False,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
           attention_mask: torch.Tensor | None = None, seed: int | None = None) -> Iterator[TokenEvent]:
    """Like :func:`generate`, but returns an iterator of :class:`TokenEvent`, one per
    token as it is made (all sequences' tokens of one step, then the next step).
    Bad arguments raise here, not at the first ``next``."""
    plan = _Plan(model, prompts, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p,
                 repetition_penalty, eos_token_id, stop_strings, attention_mask, seed)
    return _decode(plan)


class _Plan:
    """The checked arguments of one generate / stream call."""

    def __init__(self, model, prompts, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p,
                 repetition_penalty, eos_token_id, stop_strings, attention_mask, seed):
        if not isinstance(model, GPT):
            raise TypeError(f"generate takes an llmkit.models.GPT, got {type(model).__name__}")
        self.prompt_ids = _prompt_ids(prompts, tokenizer, attention_mask)
        if not self.prompt_ids:
            raise ValueError("no prompts given")
        config = model.config
        for ids in self.prompt_ids:
            if not ids:
                raise ValueError("empty prompt: give at least one token (e.g. the BOS token)")
            bad = [t for t in ids if not 0 <= t < config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
        max_new_tokens = _int_at_least("max_new_tokens", max_new_tokens, 0)
        top_k = _int_at_least("top_k", top_k, 0)
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
        temperature = _finite("temperature", temperature)
        if temperature <= 0 and do_sample:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_p = _finite("top_p", top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        repetition_penalty = _finite("repetition_penalty", repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {repetition_penalty}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if stop_strings is not None and not all(isinstance(t, str) for t in stop_strings):
            raise TypeError("stop_strings must be a str or a list of str")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text")
        longest = max(len(p) for p in self.prompt_ids)
        self.max_len = longest + max_new_tokens
        if config.position == "learned" and self.max_len > config.block_size:
            raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's position table (block_size = {config.block_size})")
        self.eos_ids = _eos_ids(eos_token_id, tokenizer, config)
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.sampling = (do_sample, temperature, top_k, top_p, repetition_penalty)
        self.stop_strings, self.seed = stop_strings, seed


def _decode(plan: _Plan, on_step=None) -> Iterator[TokenEvent]:
    """Prefill every prompt, then one token per unfinished sequence a step; on_step() after each step."""
    model, tokenizer, prompt_ids = plan.model, plan.tokenizer, plan.prompt_ids
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = len(prompt_ids)
    active = [True] * batch
    generator = torch.Generator(device=device).manual_seed(plan.seed) if plan.seed is not None else None
    history = [list(p) for p in prompt_ids]  # for the repetition penalty
    decoded = [""] * batch
    new_counts = [0] * batch
    cache = KVCache(model.config, batch, plan.max_len, device=device, dtype=dtype)
    lengths = torch.tensor([len(p) for p in prompt_ids])
    tokens = torch.tensor([t for p in prompt_ids for t in p], device=device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(plan.max_new_tokens):
            cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
            cu_seqlens[1:] = lengths.cumsum(0)
            with torch.inference_mode():
                logits = model(tokens, cu_seqlens=cu_seqlens.to(device), kv_cache=cache,
                               logits_to_keep="last").logits.float()
                rows = [b for b in range(batch) if active[b]]
                next_tokens = _choose(logits, [history[b] for b in rows], *plan.sampling, generator).tolist()
            for b, token in zip(rows, next_tokens):
                history[b].append(token)
                new_counts[b] += 1
                reason = None
                text = None
                if token in plan.eos_ids:
                    reason = "eos"
                if tokenizer is not None:
                    full = tokenizer.decode(history[b][len(prompt_ids[b]):])
                    if full.endswith("\ufffd"):  # an unfinished multi-byte character: wait for more
                        full = decoded[b]
                    if plan.stop_strings and reason is None:
                        cut = _stop_index(full, plan.stop_strings)
                        if cut is not None:
                            full, reason = full[:cut], "stop_string"
                    text = full[len(decoded[b]):] if full.startswith(decoded[b]) else full
                    decoded[b] = full
                if reason is None and new_counts[b] >= plan.max_new_tokens:
                    reason = "length"
                if reason is not None:
                    active[b] = False
                yield TokenEvent(index=b, token_id=token, text=text, finish_reason=reason)
            if on_step is not None:
                on_step()
            if not any(active):
                break
            lengths = torch.tensor([1 if active[b] else 0 for b in range(batch)])
            tokens = torch.tensor([history[b][-1] for b in range(batch) if active[b]], device=device)
    finally:
        model.train(was_training)


# ------------------------------------------------------------- helpers --

def _prompt_ids(prompts, tokenizer, attention_mask) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(p, str) for p in prompts)):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [encode_prompt(tokenizer, t) for t in texts]
    if attention_mask is not None and not isinstance(prompts, torch.Tensor):
        raise ValueError("attention_mask goes with a (batch, seqlen) prompt tensor; lists of prompts need none")
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
            raise TypeError(f"a prompt tensor must hold integer token ids, got dtype {prompts.dtype}")
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be (batch, seqlen), got shape {tuple(prompts.shape)}")
        if attention_mask is None:
            return prompts.tolist()
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompts.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
                type(attention_mask).__name__
            raise ValueError(f"attention_mask ({shape}) must be a tensor of the prompts' shape "
                             f"{tuple(prompts.shape)}")
        return [row[mask.bool()].tolist() for row, mask in zip(prompts, attention_mask)]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
            return [list(p) for p in prompts]
    raise TypeError("prompts must be a str, a list of str, a list of token ids, a list of such lists, "
                    "or a (batch, seqlen) tensor")


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _wants_bos(tokenizer, prefix: list[int], suffix: list[int]) -> bool:
    """Whether a generation prompt starts with BOS.

    What transformers 5 does is what the tokenizer.json post-processor does (it
    no longer rebuilds it from tokenizer_config.json's ``add_bos_token``): BOS
    when the template puts exactly the BOS before the text, and nothing or only
    the EOS after it (Llama's ``<s> $A``, with ``add_eos_token`` ``<s> $A </s>``).
    An encoder's wrap, whose start token is also the CLS token (RoBERTa's and
    llmkit's ``<s> A </s>``), gives no BOS. A tokenizer whose ``add_bos_token``
    is True (transformers' slow tokenizers) gets one.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", None) is True:
        return True
    if prefix != [bos]:
        return False
    if not suffix:
        return True
    return suffix == [getattr(tokenizer, "eos_token_id", None)] and getattr(tokenizer, "cls_token_id", None) is None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt for a causal LM: no EOS appended, BOS only where the tokenizer
    asks for one (see the module docstring); equal to transformers' ``tokenizer(text)`` for GPT-2
    and Llama tokenizers, and a continuation prompt for llmkit's ``<s> A </s>`` tokenizers."""
    plain = list(tokenizer.encode(text, add_special_tokens=False))
    full = list(tokenizer.encode(text, add_special_tokens=True))
    prefix, suffix = (full, []) if not plain else ([], [])  # "" -> what the template adds is all prefix
    for start in range(len(full) - len(plain) + 1) if plain else ():  # where the post-processor put the text
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            break
    bos = getattr(tokenizer, "bos_token_id", None)
    if _wants_bos(tokenizer, prefix, suffix) and bos is not None and plain[:1] != [bos]:
        return [bos] + plain
    return plain


def _eos_ids(eos_token_id, tokenizer, config) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos_token_id is None:
            eos_token_id = config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _stop_index(text: str, stop_strings) -> int | None:
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return min(ends) if ends else None


def _choose(logits: torch.Tensor, histories, do_sample, temperature, top_k, top_p, repetition_penalty,
            generator) -> torch.Tensor:
    """Next token of each row of logits (rows, vocab), transformers' processing order."""
    if repetition_penalty != 1.0:
        for row, seen in enumerate(histories):
            ids = torch.tensor(sorted(set(seen)), device=logits.device)
            scores = logits[row, ids]
            logits[row, ids] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
