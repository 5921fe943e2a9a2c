"""Whole models: llmkit's GPT vs transformers' GPT2LMHeadModel, side by side.

Both contenders hold the same weights (``GPT.from_pretrained`` of the transformers
model) and do the same work; each case checks that they agree (loss, tokens)
before timing.

Cases:

* CPU fp32, torch's threads: a training step (forward + backward of the
  next-token loss, gradients dropped) of the "gpt-6l-384" preset (6 layers,
  6 heads, 384 wide, vocabulary 8192) on batch 8 x seqlen 256, against
  GPT2LMHeadModel with attn_implementation="sdpa" and dropout 0. llmkit's
  row is its training path (``logits_to_keep="none"``: the fused LM head +
  cross-entropy); a second llmkit row computes the full logits and
  F.cross_entropy, as transformers does, to show what each part is worth.
* CPU fp32: greedy generation, llmkit.generate vs transformers' generate
  (do_sample=False, exactly max_new_tokens tokens): one 32-token prompt and
  128 new tokens; four prompts of 8-32 tokens and 64 new tokens each
  (transformers left-pads them, llmkit packs them).
* CUDA (when present): a GPT-2 124M training step in bf16 autocast, batch
  8 x 1024, eager and torch.compile'd, against transformers (SDPA), with the
  model FLOPs utilisation.

"GB/s in" reads GFLOP/s here: Case.bytes_in carries the FLOPs of a call,
nanoGPT's count (6 N + 12 L H Q T per trained token, N without position
embeddings; 2 N + 4 L H Q T per generated token at its context length).
tokens/s and MFU are in the notes.
"""
from __future__ import annotations

import torch

from . import register
from .harness import Benchmark, BenchResult, Case, Contender, RunOptions, add_note

OURS = "llmkit"
PEER = "transformers-sdpa"
GENERATE_PEER = "transformers generate"
FULL_LOGITS = "llmkit, full logits + F.cross_entropy"
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor-core peak (the MFU denominator)


def _models(preset: str, device: str):
    """(llmkit GPT, transformers GPT2LMHeadModel) with the same random weights."""
    import transformers

    from ..models import GPT, GPTConfig

    config = GPTConfig.preset(preset)
    hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_config().items()
                                           if k not in ("model_type", "architectures")})
    hf_config.resid_pdrop = hf_config.embd_pdrop = hf_config.attn_pdrop = 0.0
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).to(device)
    ours = GPT.from_pretrained(hf, device=device)
    return ours, hf, config


def flops_per_token(config, context: int, training: bool) -> float:
    """nanoGPT's estimate: 6N + 12 L H Q T (training), a third of it for a forward."""
    from ..models import GPT

    with torch.device("meta"):  # count without allocating (GPT-2 124M on the CUDA row)
        n = GPT(config).num_parameters()
    if config.position == "learned":
        n -= config.block_size * config.n_embd
    attention = 12 * config.n_layer * config.n_head * config.head_dim * context
    total = 6 * n + attention
    return total if training else total / 3


# --------------------------------------------------------------- training --

def train_case(device: str, preset: str, batch: int, seqlen: int, dtype: str, compiled: bool,
               notes: list[str]) -> Case:
    tokens = batch * seqlen
    holder = {}

    def make_inputs():
        ours, hf, config = _models(preset, device)
        holder["config"] = config
        ids = torch.randint(0, config.vocab_size, (batch, seqlen), device=device)
        return ours, hf, ids

    def step(model, ids, autocast, **options):
        def call():
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids, **options).loss
            loss.backward()
            for p in model.parameters():
                p.grad = None
            return loss.detach().float()
        return call

    autocast = dtype == "bf16"

    # llmkit's training path: the fused LM head + loss (no logits tensor).
    def setup_ours(inputs):
        ours, _, ids = inputs
        return step(ours, ids, autocast, logits_to_keep="none")

    def setup_ours_full_logits(inputs):
        ours, _, ids = inputs
        return step(ours, ids, autocast)

    def setup_ours_compiled(inputs):
        ours, _, ids = inputs
        return step(torch.compile(ours), ids, autocast, logits_to_keep="none")

    def setup_hf(inputs):
        _, hf, ids = inputs
        return step(hf, ids, autocast)

    def check(outputs):
        ref = outputs.get(PEER)
        tolerance = 1e-4 if dtype == "fp32" else 2e-2

        def note(v) -> str:
            agrees = ref is None or abs(float(v) - float(ref)) <= tolerance * float(ref)
            return f"loss {float(v):.5f}" + ("" if agrees else f" DIFFERS from {PEER}'s {float(ref):.5f}")

        return {name: note(v) for name, v in outputs.items()}

    contenders = [Contender(OURS, setup_ours, ours=True), Contender(FULL_LOGITS, setup_ours_full_logits)]
    if compiled:
        contenders.append(Contender("llmkit (torch.compile)", setup_ours_compiled))
    contenders.append(Contender(PEER, setup_hf))
    from ..models import GPTConfig
    config = GPTConfig.preset(preset)
    flops = flops_per_token(config, seqlen, training=True) * tokens
    return Case(name=f"train step {dtype} {preset} b{batch} s{seqlen}", device=device, bytes_in=int(flops),
                bytes_moved=0, contenders=contenders, make_inputs=make_inputs, check=check,
                params={"kind": "train", "tokens": tokens, "flops": flops, "dtype": dtype, "preset": preset},
                notes=notes, max_call_s=30.0, budget_s=16.0)


# ------------------------------------------------------------- generation --

def generate_case(device: str, preset: str, prompt_lengths: list[int], new_tokens: int) -> Case:
    def make_inputs():
        ours, hf, config = _models(preset, device)
        torch.manual_seed(1)
        prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in prompt_lengths]
        width = max(prompt_lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as transformers' decoder-only generate expects
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ours.eval(), hf.eval(), prompts, ids.to(device), mask.to(device)

    def setup_ours(inputs):
        import llmkit
        ours, _, prompts, _, _ = inputs
        return lambda: llmkit.generate(ours, prompts, max_new_tokens=new_tokens, eos_token_id=[]).sequences

    def setup_hf(inputs):
        _, hf, _, ids, mask = inputs

        def call():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
            return out[:, ids.shape[1]:].tolist()
        return call

    def check(outputs):
        ref = outputs.get(GENERATE_PEER)
        ours = outputs.get(OURS)
        if ref is None or ours is None:
            return {}
        same = sum(a == b for a, b in zip(ours, ref))
        return {OURS: f"{same}/{len(ref)} sequences token-for-token equal to {GENERATE_PEER}'s"}

    from ..models import GPTConfig
    config = GPTConfig.preset(preset)
    mean_context = sum(n + new_tokens / 2 for n in prompt_lengths) / len(prompt_lengths)
    tokens = len(prompt_lengths) * new_tokens
    flops = flops_per_token(config, int(mean_context), training=False) * tokens
    lengths = ",".join(map(str, prompt_lengths)) if len(set(prompt_lengths)) > 1 else str(prompt_lengths[0])
    return Case(name=f"greedy generate {preset} b{len(prompt_lengths)} prompt {lengths} +{new_tokens}",
                device=device, bytes_in=int(flops), bytes_moved=0,
                contenders=[Contender(OURS, setup_ours, ours=True), Contender(GENERATE_PEER, setup_hf)],
                make_inputs=make_inputs, check=check, max_call_s=30.0, budget_s=8.0,
                params={"kind": "generate", "tokens": tokens, "flops": flops})


# ------------------------------------------------------------------ cases --

def model_cases(opts: RunOptions) -> list[Case]:
    cases = []
    if "cpu" in opts.devices:
        if opts.quick:
            cases.append(train_case("cpu", "gpt-tiny", 4, 64, "fp32", False, []))
            cases.append(generate_case("cpu", "gpt-tiny", [8], 16))
        else:
            cases.append(train_case("cpu", "gpt-6l-384", 8, 256, "fp32", False, []))
            cases.append(generate_case("cpu", "gpt-6l-384", [32], 128))
            cases.append(generate_case("cpu", "gpt-6l-384", [8, 16, 24, 32], 64))
    if "cuda" in opts.devices and torch.cuda.is_available():
        note = (f"MFU = model FLOP/s / {H100_BF16_DENSE_TFLOPS:g} TFLOP/s (H100 SXM dense bf16); "
                "the attention bench's matmul peak is the machine's own ceiling")
        if opts.quick:
            cases.append(train_case("cuda", "gpt-tiny", 8, 256, "bf16", False, [note]))
        else:
            cases.append(train_case("cuda", "gpt2", 8, 1024, "bf16", True, [note]))
            cases.append(generate_case("cuda", "gpt2", [32], 128))
    return cases


def note_rates(result: BenchResult) -> None:
    """tokens/s for every row; MFU for CUDA training rows."""
    for case in result.cases:
        for m in case.measurements:
            if not m.ok:
                continue
            rate = case.params["tokens"] / m.median_s
            note = f"{rate:,.0f} tokens/s"
            if case.device == "cuda" and case.params["kind"] == "train":
                mfu = case.params["flops"] / m.median_s / (H100_BF16_DENSE_TFLOPS * 1e12)
                note += f", MFU {mfu:.1%}"
            add_note(m, note)


register(Benchmark(
    name="models",
    description="GPT training step and greedy generation: llmkit vs transformers on the same weights; "
                "'GB/s in' = GFLOP/s here (nanoGPT's 6N + 12LHQT per trained token)",
    cases=model_cases,
    finish=note_rates,
))
