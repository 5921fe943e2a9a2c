"""`llmkit demo`: NF4, attention, LoRA, word2vec, transformer models, pretraining; quick benchmarks.

For each layer: quantize the weight with llmkit's NF4 (blocksize 64, double
quant), dequantize it, and report the weight error, the bits per parameter
with the quantization state counted, the memory saved, how much the layer's
output moves on a random batch, and whether bitsandbytes produces the same
bytes. Then run `llmkit bench nf4 --quick` and print its table.

Attention: a small GPT-2 (built from a config: no downloads) runs once with
transformers' SDPA attention and once with attn_implementation="llmkit"
(our flash kernel), same weights, and the logits are compared; then a
Longformer-style sliding window with a global token at seqlen 8192, which
dense attention would need a 64M-entry mask for; then `llmkit bench
attention --quick`.

Word embeddings: word2vec skip-gram trained on the corpus llmkit ships
(5.6 M words, about a minute on 2 cores), then analogies, nearest
neighbours, the analogy / wordsim353 scores, Bolukbasi et al.'s extreme
she/he occupations and a 2-D PCA plot (PNG) of gendered word pairs.

Transformer models: GPT-2 and Llama checkpoints (random weights, built from
transformers configs) in llmkit's GPT with their logits, a save_pretrained round trip
and greedy generation compared with transformers; RoBERTa, T5 and
Longformer logits likewise; then `llmkit bench models --quick`.

Pretraining: a small GPT (causal LM) and a small BERT (masked LM, whole
words) trained from scratch on the first 20,000 documents of the shipped
corpus with `llmkit.train` (tokenizers trained on the same text, cached),
their validation loss / perplexity / MLM accuracy, loss-curve PNGs, greedy
completions and filled masks.
"""
from __future__ import annotations

import copy
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llmkit.utils import atomic_write, get_logger, optional, progress_bar
from llmkit.utils.cliargs import add_output_argument

log = get_logger(__name__)
OUTPUT_DIR: Path | None = None  # -o/--output; None: bench/results under the git root (else the cwd)


def output_dir() -> Path:
    from llmkit.bench.harness import default_out_dir

    out = OUTPUT_DIR or default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig, name: str) -> str:
    """Write a matplotlib figure as PNG into the output directory (atomically); return its path."""
    path = output_dir() / name
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return str(path)

BLOCKSIZE = 64
BATCH = 32
MIB = 1024 * 1024


@dataclass
class DemoLayer:
    name: str
    short_name: str  # for the progress bar
    weight: torch.Tensor
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weight) -> output
    in_features: int


def gpt2_like_linear(size: int = 4096) -> DemoLayer:
    layer = torch.nn.Linear(size, size)
    torch.nn.init.normal_(layer.weight, mean=0.0, std=0.02)  # GPT-2's init for Linear weights
    return DemoLayer(f"nn.Linear({size}, {size}), GPT-2 init", "Linear", layer.weight.detach(), lambda x, w: x @ w.T,
                     size)


def gpt2_c_fc() -> DemoLayer | str:
    """The c_fc weight of a randomly initialised GPT2Block (no download), or why there is none."""
    try:
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    except ImportError as err:
        return f"transformers is not installed ({err}); skipped the GPT2Block c_fc layer"
    config = GPT2Config()
    c_fc = GPT2Block(config).mlp.c_fc
    # transformers' Conv1D stores the weight as (in, out) and computes x @ W.
    return DemoLayer(f"GPT2Block(GPT2Config()).mlp.c_fc (transformers Conv1D {config.n_embd}->{4 * config.n_embd})",
                     "GPT2 c_fc", c_fc.weight.detach(), lambda x, w: x @ w, config.n_embd)


def state_nbytes(state) -> int:
    """Stored statistics: absmax, plus nested absmax and offset with double quant
    (the 16- and 256-entry code tables are shared constants and left out)."""
    from llmkit.bench.nf4 import state_tensors

    return sum(t.numel() * t.element_size() for t in state_tensors(state).values())


STEPS = ("quantize", "dequantize", "weight error", "layer output", "bitsandbytes")


def round_trip(layer: DemoLayer, bar) -> list[str]:
    """Quantize, dequantize and measure one layer; return report lines."""
    from llmkit import ops
    from llmkit.bench.nf4 import compare_quantized

    def done(step):
        bar.set_postfix_str(f"{layer.short_name}: {step} done")
        bar.update(1)

    w = layer.weight
    packed, state = ops.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True)
    done("quantize")
    w_nf4 = ops.dequantize_nf4(packed, state, out_dtype=w.dtype)
    done("dequantize")

    err = (w_nf4 - w).abs()
    rel_fro = (torch.linalg.vector_norm(w_nf4 - w) / torch.linalg.vector_norm(w)).item()
    before = w.numel() * w.element_size()
    packed_bytes, stats_bytes = packed.numel() * packed.element_size(), state_nbytes(state)
    after = packed_bytes + stats_bytes
    bf16 = w.numel() * 2
    done("weight error")

    x = torch.randn(BATCH, layer.in_features, dtype=w.dtype)
    y, y_nf4 = layer.forward(x, w), layer.forward(x, w_nf4)
    out_rel = (torch.linalg.vector_norm(y_nf4 - y) / torch.linalg.vector_norm(y)).item()
    done("layer output")

    try:
        import bitsandbytes.functional as bnbf

        theirs = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        vs_bnb = compare_quantized((packed, state), theirs, "llmkit")
    except Exception as err:  # optional peer: report, do not abort the demo
        vs_bnb = f"not compared: {type(err).__name__}: {err}"
    done("bitsandbytes")

    shape = "x".join(map(str, w.shape))
    dtype = str(w.dtype).removeprefix("torch.")
    return [
        f"{layer.name}",
        f"  weight          {shape} {dtype}, std {w.float().std().item():.5f} (measured)",
        f"  weight error    max |W - W_nf4| {err.max().item():.3e}, mean {err.mean().item():.3e}, "
        f"relative Frobenius {rel_fro:.3e}",
        f"  storage         {before / MIB:.2f} MiB {dtype} -> {after / MIB:.2f} MiB NF4 "
        f"(packed {packed_bytes / MIB:.2f} MiB + state {stats_bytes / MIB:.3f} MiB): "
        f"{8 * after / w.numel():.3f} bits/param, saves {1 - after / before:.1%} "
        f"({1 - after / bf16:.1%} vs bf16)",
        f"  layer output    x[{BATCH}x{layer.in_features}] through W vs W_nf4: relative error {out_rel:.3e} "
        "(Frobenius)",
        f"  bitsandbytes    {vs_bnb}",
    ]


def gpt2_on_llmkit_attention(seqlen: int = 512) -> list[str]:
    """Same GPT-2 weights through transformers' SDPA and through llmkit's kernel."""
    try:
        import transformers
    except ImportError:
        return ["note: transformers is not installed: GPT-2 comparison skipped"]
    from llmkit.integrations import transformers as llmkit_hf

    llmkit_hf.register()
    config = transformers.GPT2Config(n_layer=4, n_head=8, n_embd=512, n_positions=1024, vocab_size=8192,
                                     bos_token_id=0, eos_token_id=0)
    # Each model gets its own config: the attention implementation lives there.
    reference = transformers.GPT2LMHeadModel._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = transformers.GPT2LMHeadModel._from_config(copy.deepcopy(config), attn_implementation="llmkit").eval()
    ours.load_state_dict(reference.state_dict())
    calls_before = llmkit_hf.kernel_calls()
    ids = torch.randint(0, config.vocab_size, (2, seqlen))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids).logits
    on_kernel = llmkit_hf.kernel_calls() - calls_before
    diff = (got - expected).abs().max().item()
    return [f"GPT-2 (4 layers, 8 heads x 64, 2 x {seqlen} tokens), attn_implementation='llmkit' vs 'sdpa':",
            f"  max |logit difference| {diff:.2e} (scale of logits {expected.abs().max().item():.2f}); "
            f"{on_kernel} attention calls ran on llmkit's kernel"]


def sliding_window_with_global_token(seqlen: int = 8192) -> list[str]:
    from llmkit.ops import flash_attention

    heads, head_dim, window = 8, 64, (256, 256)
    q, k, v = (torch.randn(1, seqlen, heads, head_dim) for _ in range(3))
    glob = torch.zeros(1, seqlen, dtype=torch.bool)
    glob[0, 0] = True  # a [CLS]-like token that sees, and is seen by, every token
    start = time.perf_counter()
    out = flash_attention(q, k, v, window=window, global_tokens=glob)
    elapsed = time.perf_counter() - start
    visible = seqlen * (window[0] + window[1] + 1) + 2 * seqlen
    return [f"Longformer attention, seqlen {seqlen}, window +-256, global token 0: {elapsed * 1e3:.0f} ms, "
            f"out {tuple(out.shape)}",
            f"  ~{visible / seqlen**2:.1%} of the {seqlen}x{seqlen} score matrix computed, "
            f"and none of it stored (dense attention would need a {seqlen**2 / 2**20:.0f}M-entry mask)"]


# Charles Dickens, A Tale of Two Cities (1859): public domain.
QLORA_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way - in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only. "
)


def qlora_finetune(steps: int = 60) -> list[str]:
    """A byte-level GPT-2 (from a config) turned into a QLoRA model and fine-tuned on a paragraph."""
    try:
        import transformers
    except ImportError:
        return ["note: transformers is not installed: QLoRA fine-tune skipped"]
    from llmkit.adapt.lora import trainable_parameters
    from llmkit.adapt.qlora import prepare_qlora, qlora_memory_report

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=128, vocab_size=256,
                                     bos_token_id=10, eos_token_id=10)  # bytes: "\n" ends a document
    model = transformers.GPT2LMHeadModel(config)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prepare_qlora(model, r=16, lora_alpha=32, lora_dropout=0.05)
    report = qlora_memory_report(model)
    data = torch.tensor(list(QLORA_TEXT.encode("utf-8")))
    seqlen, batch = 64, 8
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in progress_bar(range(steps), desc="QLoRA fine-tune", leave=False):
        starts = torch.randint(0, data.numel() - seqlen - 1, (batch,))
        ids = torch.stack([data[s:s + seqlen] for s in starts])
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    plot = _save_loss_plot(losses, "QLoRA fine-tune (GPT-2 4x256, byte level, NF4 base + LoRA r=16)")
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return [
        "QLoRA: GPT-2 (4 layers x 256, byte-level) from a config, every linear layer NF4 (double quant) + LoRA r=16:",
        f"  {trainable_parameters(model)}",
        f"  base weights {report.bytes_per_base_param:.4f} bytes/parameter; model {report.total_bytes / MIB:.2f} MiB "
        f"vs {dense_bytes / MIB:.2f} MiB in fp32",
        f"  {steps} AdamW steps on a Dickens paragraph: loss {head:.3f} -> {tail:.3f} (mean of the first / last 5)"
        + (f"; curve: {plot}" if plot else ""),
    ]


def _save_loss_plot(losses: list[float], title: str) -> str | None:
    if optional("matplotlib") is None:
        log.warning("matplotlib is not installed: no loss-curve PNG (pip install 'llmkit[plot]')")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, "demo-qlora-loss.png")


# (a, b, c, expected): a - b + c should be near `expected` (3CosAdd, as gensim's most_similar).
DEMO_ANALOGIES = [("king", "man", "woman", "queen"), ("king", "he", "she", "queen"), ("him", "he", "she", "her"),
                  ("took", "take", "give", "gave"), ("went", "go", "see", "saw"), ("boys", "boy", "girl", "girls"),
                  ("walked", "walk", "run", "ran"), ("brother", "man", "woman", "sister"),
                  ("better", "good", "bad", "worse"), ("paris", "france", "italy", "rome")]
DEMO_NEIGHBOURS = ["france", "tuesday", "river", "night", "god", "computer"]
DEMO_PCA_PAIRS = [("man", "woman"), ("king", "queen"), ("he", "she"), ("brother", "sister"), ("father", "mother"),
                  ("son", "daughter"), ("boy", "girl"), ("uncle", "aunt"), ("husband", "wife"), ("lord", "lady")]


def word_embeddings(quick: bool = False) -> list[str]:
    """word2vec skip-gram on the shipped corpus: analogies, neighbours, scores, the bias table, a PCA plot."""
    from llmkit.data import english_corpus_sentences
    from llmkit.embeddings import Word2Vec
    from llmkit.embeddings.bias import bias_report

    # quick: the first 60k sentences (~0.7 M words), 2 epochs -- seconds, and still real neighbours.
    sentences = english_corpus_sentences()
    epochs = 5
    if quick:
        sentences, epochs = list(itertools.islice(sentences, 60_000)), 2
    print(f"word2vec: skip-gram, negative sampling (5, shared per window), window 5, dim 100, {epochs} epochs on "
          "the shipped corpus (lowercased, punctuation dropped)...", file=sys.stderr)
    model = Word2Vec(sentences, sg=1, epochs=epochs, compute_loss=True, workers=max(1, torch.get_num_threads()),
                     seed=1)
    kv, stats = model.wv, model.training_stats[-1]
    lines = [f"word2vec on the shipped corpus ({model.corpus_total_words:,} words, vocabulary {len(kv):,} at "
             f"min_count 5, {epochs} epochs): {stats['seconds']:.1f} s, {stats['words_per_second']:,.0f} words/s, "
             f"loss {stats['loss_per_example']:.3f}/example"]
    lines.append("  analogies (a - b + c, top 3; * marks the expected word):")
    for a, b, c, expected in DEMO_ANALOGIES:
        if any(w not in kv for w in (a, b, c)):
            continue
        top = [w for w, _ in kv.most_similar(positive=[a, c], negative=[b], topn=3)]
        shown = ", ".join(f"*{w}*" if w == expected else w for w in top)
        lines.append(f"    {a} - {b} + {c} = {shown}" + ("" if expected in top else f"   (expected {expected})"))
    lines.append("  nearest neighbours (cosine):")
    for word in DEMO_NEIGHBOURS:
        if word in kv:
            lines.append(f"    {word:9s} " + ", ".join(w for w, _ in kv.most_similar(word, topn=6)))
    try:
        from gensim.test.utils import datapath

        analogy, _ = kv.evaluate_word_analogies(datapath("questions-words.txt"))
        _, spearman, oov = kv.evaluate_word_pairs(datapath("wordsim353.tsv"))
        lines.append(f"  questions-words.txt analogy accuracy {100 * analogy:.2f}%; wordsim353 Spearman "
                     f"{spearman[0]:.3f} ({oov:.1f}% pairs out of vocabulary); `llmkit bench word2vec` "
                     "compares with gensim")
    except ImportError:
        lines.append("  (gensim is not installed: its questions-words.txt / wordsim353.tsv are not available)")
    lines.append("")
    lines.append("  Bias (Bolukbasi et al. 2016), `llmkit embeddings bias`:")
    lines += ["    " + line for line in bias_report(kv, n=8).splitlines()]
    plot = _save_pca_plot(kv, DEMO_PCA_PAIRS)
    if plot:
        lines.append(f"  2-D PCA of gendered word pairs: {plot}")
    return lines


def _save_pca_plot(kv, pairs) -> str | None:
    """The pairs' unit vectors projected on their first two principal components, an arrow per pair."""
    if optional("matplotlib") is None:
        log.warning("matplotlib is not installed: no PCA plot (pip install 'llmkit[plot]')")
        return None
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = [(a, b) for a, b in pairs if a in kv and b in kv]
    if len(pairs) < 2:
        return None
    words = [w for pair in pairs for w in pair]
    x = np.stack([kv.get_vector(w, norm=True) for w in words])
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig = Figure(figsize=(6.5, 5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i in range(len(pairs)):
        (x0, y0), (x1, y1) = xy[2 * i], xy[2 * i + 1]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="tab:gray", lw=0.8))
        ax.scatter([x0, x1], [y0, y1], c=["tab:blue", "tab:red"], s=14)
        ax.annotate(pairs[i][0], (x0, y0), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.annotate(pairs[i][1], (x1, y1), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_title("word2vec on llmkit's corpus: PCA of he/she-type pairs (arrows point male -> female)", fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return save_figure(fig, "demo-word2vec-pca.png")


def transformer_models(quick: bool = False) -> list[str]:
    """GPT-2 and Llama checkpoints (random weights, built from configs) in llmkit's GPT:
    same logits as transformers, a round trip through a checkpoint directory,
    and greedy generation token for token equal to transformers' generate."""
    import tempfile
    import time

    try:
        import transformers
    except ImportError:
        return ["Models: skipped (transformers is not installed)"]
    import llmkit
    from llmkit.models import GPT

    transformers.logging.set_verbosity_error()
    lines = ["Transformer models on llmkit attention (random weights from transformers configs):"]
    new_tokens = 16 if quick else 48
    torch.manual_seed(0)
    builds = {
        "GPT-2 (6 layers, 384 wide)": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=8192, n_positions=256, n_layer=6, n_head=6, n_embd=384, attn_implementation="sdpa")),
        "Llama (GQA 8/2 heads, RoPE, SwiGLU)": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa")),
    }
    for label, build in builds.items():
        hf = build().eval()
        ours = GPT.from_pretrained(hf)
        ids = torch.randint(0, 8192, (2, 64))
        with torch.no_grad():
            ref, got = hf(ids).logits, ours(ids).logits
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
            with torch.no_grad():
                round_trip = (reloaded(ids).logits - ref).abs().max().item()
        prompt = torch.randint(0, 8192, (1, 16))
        start = time.perf_counter()
        with torch.inference_mode():
            hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, 16:].tolist()
        hf_rate = new_tokens / (time.perf_counter() - start)
        out = llmkit.generate(ours, prompt, max_new_tokens=new_tokens, eos_token_id=[])
        lines += [f"  {label}: {ours.num_parameters() / 1e6:.1f}M parameters",
                  f"    logits vs transformers: max |diff| {(got - ref).abs().max().item():.1e} "
                  f"(max |logit| {ref.abs().max().item():.1f}); save_pretrained -> transformers reload: "
                  f"{round_trip:.1e}",
                  f"    greedy generation, {new_tokens} tokens: "
                  f"{'identical to' if out.sequences[0] == hf_tokens else 'DIFFERS from'} "
                  f"transformers' generate; {out.tokens_per_second:.0f} tokens/s vs {hf_rate:.0f}"]
    lines += _encoder_models(transformers)
    return lines


def _encoder_models(transformers) -> list[str]:
    """RoBERTa (padding-free), T5 (relative position bias) and Longformer (window +
    global tokens) against transformers on a padded batch."""
    from llmkit.models import T5, BertForMaskedLM, LongformerForMaskedLM

    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 48))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    keep = mask.bool()
    lines = []
    roberta = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=130)).eval()
    ours = BertForMaskedLM.from_pretrained(roberta).eval()
    with torch.no_grad():
        got, ref = ours(ids, attention_mask=mask).logits[keep], roberta(ids, attention_mask=mask).logits[keep]
        diff = (got - ref).abs().max()
    lines.append(f"  RoBERTa MLM (padding-free, varlen attention): max |logit diff| vs transformers {diff:.1e}")
    t5_hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=1000, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    t5 = T5.from_pretrained(t5_hf).eval()
    labels = torch.randint(5, 1000, (2, 12))
    with torch.no_grad():
        diff = (t5(ids, attention_mask=mask, labels=labels).logits
                - t5_hf(input_ids=ids, attention_mask=mask, labels=labels).logits).abs().max()
        same = (t5.generate(ids, attention_mask=mask, max_new_tokens=16).tolist()
                == t5_hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False).tolist())
    lines.append(f"  T5 v1.1 (relative position bias through attn_bias): max |logit diff| {diff:.1e}; "
                 f"greedy generate {'identical to' if same else 'DIFFERS from'} transformers'")
    longformer = transformers.LongformerForMaskedLM(transformers.LongformerConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=130, attention_window=16)).eval()
    ours = LongformerForMaskedLM.from_pretrained(longformer).eval()
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    with torch.no_grad():
        diff = (ours(ids, attention_mask=mask, global_attention_mask=glob).logits[keep]
                - longformer(ids, attention_mask=mask, global_attention_mask=glob).logits[keep]).abs().max()
    lines.append(f"  Longformer (window 16, [CLS] global): max |logit diff| vs transformers {diff:.1e}")
    return lines


DEMO_PROMPTS = ["It is a truth universally acknowledged", "The President", "Call me"]
DEMO_MASKED = ["the ship sailed across the [MASK].", "she was the [MASK] of the family.",
               "the capital of france is [MASK]."]


def pretraining(documents: int = 20_000, steps: int = 500) -> list[str]:
    """Pretrain a small GPT and a small BERT on the shipped corpus; loss curves and samples."""
    import shutil
    import tempfile
    from pathlib import Path

    from llmkit.train import TrainConfig
    from llmkit.train.pipeline import pretrain
    from llmkit.train.samples import complete, mask_candidates

    lines = [f"Pretraining from scratch on the shipped corpus (first {documents:,} documents; tokenizers "
             "trained on them, cached under ~/.cache/llmkit):"]
    out_dir = output_dir()
    every = max(steps // 4, 1)
    runs = [
        ("GPT, causal LM", "gpt-tiny", dict(n_layer=4, n_head=4, n_embd=128, block_size=128), {},
         dict(steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=min(30, steps // 5))),
        ("BERT, masked LM (whole words)", "bert-tiny", dict(max_position_embeddings=128), {"whole_word": True},
         dict(steps=steps, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=min(30, steps // 5))),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, overrides, objective_options, train in runs:
            print(f"pretraining {label} ({preset}) ...", file=sys.stderr)
            config = TrainConfig(out_dir=str(Path(tmp) / preset), eval_every=every, eval_samples=128, seed=0,
                                 weight_decay=0.1, **train)
            outcome = pretrain(preset, None, None, config, vocab_size=4096, model_overrides=overrides,
                               objective_options=objective_options, max_documents=documents, export=False)
            trainer, tokenizer = outcome["trainer"], outcome["tokenizer"]
            records = [r for r in trainer.metrics.records() if r["split"] == "train"]
            seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
            val = outcome["result"]["val"]
            plot = out_dir / f"demo-pretrain-{trainer.objective.name}-loss.png"
            png = Path(tmp) / preset / "loss.png"
            if png.is_file():  # drawn only when matplotlib is installed
                shutil.copyfile(png, plot)
            lines.append(f"  {label}: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {config.steps} steps x "
                         f"{config.batch_size} x {config.seq_len} tokens in {seconds:.0f} s "
                         f"({sum(r['tokens'] for r in records) / seconds:,.0f} tokens/s)")
            lines.append(f"    training loss {records[0]['loss']:.2f} -> {records[-1]['loss']:.2f}; validation loss "
                         f"{val['loss']:.3f}, perplexity {val['ppl']:.1f}"
                         + (f", MLM accuracy {100 * val['accuracy_mlm']:.1f}%" if "accuracy_mlm" in val else "")
                         + f"; loss curve {plot}")
            if trainer.objective.name == "clm":
                lines.append("    samples (temperature 0.8, top-k 40):")
                for i, prompt in enumerate(DEMO_PROMPTS):
                    text = complete(trainer.model, tokenizer, prompt, 20, do_sample=True, temperature=0.8, top_k=40,
                                    seed=i)
                    lines.append(f"      {text!r}")
            else:
                lines.append("    top-3 guesses for [MASK]:")
                for text in DEMO_MASKED:
                    guesses = mask_candidates(trainer.model, tokenizer, text, 3)
                    lines.append(f"      {text:40s} " + "; ".join(", ".join(g) for g in guesses))
    lines.append("  (`llmkit pretrain --model PRESET` trains any preset on any text; `llmkit bench pretrain` "
                 "compares with transformers' Trainer)")
    return lines


# ------------------------------------------------------------------------------------------ sections
# Each section prints its own report; `quick` shrinks it to seconds (smaller shapes, fewer steps, no
# benchmark) so `llmkit demo --quick` runs everything in a few minutes and the tests can run it.


def _bench_table(name: str, note: str) -> None:
    from llmkit.bench import make_options, print_table, registered, run_benchmark

    print(note + "\n")
    result = run_benchmark(registered()[name], make_options(quick=True))
    print_table(result)
    print(f"(benchmark: {result.wall_s:.1f} s; not saved: `llmkit bench {name}` writes JSON and a plot)\n")


def section_nf4(quick: bool) -> None:
    print(f"NF4 (blocksize {BLOCKSIZE}, double quant) round trip, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    layers: list[DemoLayer] = [gpt2_like_linear(1024 if quick else 4096)]
    gpt2 = None if quick else gpt2_c_fc()
    if isinstance(gpt2, str):
        print(f"note: {gpt2}\n")
    elif gpt2 is not None:
        layers.append(gpt2)
    with progress_bar(total=len(layers) * len(STEPS), desc="NF4 round trip", leave=False) as bar:
        reports = [round_trip(layer, bar) for layer in layers]
    for lines in reports:
        print("\n".join(lines) + "\n")
    if not quick:
        _bench_table("nf4", "NF4 benchmark (quick: 1024x1024; `llmkit bench nf4` runs 4096x4096):")


def section_qlora(quick: bool) -> None:
    print("\n".join(qlora_finetune(steps=15 if quick else 60)) + "\n")
    if not quick:
        _bench_table("lora", "LoRA benchmark (quick: 1024x1024, 256 tokens; `llmkit bench lora` runs 4096x4096, "
                             "2048 tokens):")


def section_attention(quick: bool) -> None:
    print("\n".join(gpt2_on_llmkit_attention(seqlen=128 if quick else 512)) + "\n")
    print("\n".join(sliding_window_with_global_token(seqlen=2048 if quick else 8192)) + "\n")
    if not quick:
        _bench_table("attention", "Attention benchmark (quick shapes; `llmkit bench attention` runs seqlen 1k-16k):")


def section_embeddings(quick: bool) -> None:
    print("\n".join(word_embeddings(quick)) + "\n")


def section_models(quick: bool) -> None:
    print("\n".join(transformer_models(quick)) + "\n")
    if not quick:
        _bench_table("models", "Models benchmark (quick: gpt-tiny; `llmkit bench models` runs the 6-layer "
                               "384-wide GPT):")


def section_pretraining(quick: bool) -> None:
    print("\n".join(pretraining(documents=2_000 if quick else 20_000, steps=30 if quick else 500)) + "\n")


# name -> (what it shows, run(quick)); in the order the demo tells the story.
SECTIONS: dict[str, tuple[str, Callable[[bool], None]]] = {
    "nf4": ("NF4 quantization round trip (error, bits/param, bytes vs bitsandbytes)", section_nf4),
    "qlora": ("QLoRA fine-tune of a byte-level GPT-2 (NF4 base + LoRA), loss curve", section_qlora),
    "attention": ("GPT-2 on llmkit attention vs SDPA; Longformer window + global token", section_attention),
    "embeddings": ("word2vec on the shipped corpus: analogies, neighbours, scores, bias, PCA plot",
                   section_embeddings),
    "models": ("GPT-2 / Llama / RoBERTa / T5 / Longformer vs transformers: logits, checkpoints, generation",
               section_models),
    "pretraining": ("a small GPT (CLM) and BERT (whole-word MLM) pretrained from scratch", section_pretraining),
}


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="every section in small (about 2 minutes on 2 cores; the full demo takes about 15)")
    parser.add_argument("--section", action="append", default=None, metavar="NAME",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    add_output_argument(parser, help="directory for the PNGs (default: bench/results under the git root, "
                                     "else the current directory)")


def run_from_args(args) -> int:
    if args.list:
        for name, (what, _) in SECTIONS.items():
            print(f"  {name:<12} {what}")
        return 0
    names = args.section or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown demo section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    return main(names, quick=args.quick, output=args.output)


def main(sections: list[str] | None = None, quick: bool = False, output=None) -> int:
    global OUTPUT_DIR
    if output is not None:
        OUTPUT_DIR = Path(output)
    torch.manual_seed(0)
    names = sections or list(SECTIONS)
    print(f"llmkit demo{' --quick' if quick else ''}: {', '.join(names)}\n")
    for name in names:
        started = time.perf_counter()
        print(f"== {name}: {SECTIONS[name][0]} ==\n")
        SECTIONS[name][1](quick)
        log.info("(%s: %.0f s)", name, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
