"""The transformers side of `llmkit bench pretrain`: the equivalent Hugging Face
model trained with transformers' own ``Trainer``.

:func:`train_reference` builds the transformers counterpart of an llmkit preset
from its config (through the same mapping as the models' ``to_hf``:
GPT2LMHeadModel for a GPT-2-style GPTConfig, LlamaForCausalLM / Mistral /
Qwen2 for the Llama-style ones, BertForMaskedLM / RobertaForMaskedLM for a
BertConfig), feeds it exactly the batches the llmkit run sees and reports
validation loss and throughput measured the same way on both sides.

How the batches are pinned down:

* CLM: the blocks are taken in ``order`` (the llmkit side's seeded
  permutation), step s gets ``order[s*B:(s+1)*B]``; the Trainer reads them
  with ``train_sampling_strategy="sequential"`` and ``drop_last``, so there is
  no shuffling of its own. The dataset yields ``{"input_ids": block,
  "labels": block}``: the model shifts the labels.
* MLM: the caller masks (``mlm_batches``, one dict of (B, L) tensors per
  step, and ``mlm_val_batches``), so both contenders see identical masks;
  the dataset is their rows in order.

Things transformers' Trainer does its own way (left as they are: this is
the reference as users run it): the AdamW is torch's fused one
(``adamw_torch_fused``, betas 0.9 / 0.999, eps 1e-8 unless given), weight
decay skips biases and LayerNorm weights, and the warmup's first step has
learning rate 0 (lr = lr * step / warmup_steps for step = 0, 1, ...).
One thing is set right: GPT2LMHeadModel gets ``loss_type = "ForCausalLM"``,
without which transformers 5's Trainer divides its summed loss by B * L
labels rather than the B * (L - 1) predicted tokens.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["train_reference", "build_reference_model", "hf_config_for"]

_MLM_KEYS = ("input_ids", "labels", "attention_mask", "token_type_ids")


# ------------------------------------------------------------------ model --

def hf_config_for(family: str, config: dict) -> dict:
    """The transformers config dict of an llmkit config (as a dict): the
    mapping llmkit's ``to_hf`` writes, so weights move between the two as is."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of the llmkit config's fields (dataclasses.asdict), "
                        f"got {type(config).__name__}")
    if family == "gpt":
        from ..models import GPTConfig
        hf = _llmkit_config(GPTConfig, config).to_hf_config()
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            hf.setdefault(key, None)  # not GPT2Config's 50256, outside a small vocabulary
        return hf
    if family == "bert":
        from ..models.bert import BertConfig, BertForMaskedLM
        bert = _llmkit_config(BertConfig, config)
        hf = bert.to_hf_config()
        arch = BertForMaskedLM._HF_ARCH.get(bert.model_type)
        if arch is None:
            raise ValueError(f"no transformers masked-LM model for model_type {bert.model_type!r}")
        hf["architectures"] = [arch]
        return hf
    raise ValueError(f'family must be "gpt" or "bert", got {family!r}')


def _llmkit_config(cls, config: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; pass dataclasses.asdict of the preset's config")
    return cls(**config)


def build_reference_model(family: str, config: dict, init_dir: str | Path | None = None):
    """The transformers model for an llmkit config: freshly initialised by
    transformers (seed torch first), or with the weights of ``init_dir``
    (a local checkpoint, e.g. written by llmkit's ``to_hf``; nothing is
    downloaded)."""
    import transformers

    hf = hf_config_for(family, config)
    model_type = hf.pop("model_type")
    arch = hf["architectures"][0]
    hf_config = transformers.AutoConfig.for_model(model_type, **hf)
    model_class = getattr(transformers, arch)
    if init_dir is None:
        return model_class(hf_config)
    init_dir = Path(init_dir)
    if not (init_dir / "config.json").is_file():
        raise FileNotFoundError(f"{init_dir} is not a checkpoint directory (no config.json)")
    return model_class.from_pretrained(init_dir, config=hf_config, local_files_only=True)


# --------------------------------------------------------------- datasets --

class _Rows(torch.utils.data.Dataset):
    """Examples in the order the Trainer will batch them (sequential sampler)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns
        self.n = next(iter(columns.values())).shape[0]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def _check_blocks(name: str, blocks, vocab_size: int) -> np.ndarray:
    if not isinstance(blocks, np.ndarray) or blocks.ndim != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        shape = getattr(blocks, "shape", type(blocks).__name__)
        raise ValueError(f"{name} must be a (n_blocks >= 1, seq_len >= 2) numpy array of token ids, got {shape}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {blocks.dtype}")
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the vocabulary [0, {vocab_size})")
    return blocks.astype(np.int64, copy=False)


def _clm_dataset(train_blocks, order, steps: int, batch_size: int) -> _Rows:
    need = steps * batch_size
    if order is None:
        index = np.arange(need) % train_blocks.shape[0]  # 0, 1, 2, ... wrapping around
    else:
        index = np.asarray(order)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"order must be a 1-D integer array of block indices, got shape {index.shape} "
                             f"dtype {index.dtype}")
        if index.shape[0] < need:
            raise ValueError(f"order has {index.shape[0]} entries; {steps} steps of {batch_size} blocks need {need}")
        if index.min() < 0 or index.max() >= train_blocks.shape[0]:
            raise ValueError(f"order holds indices outside [0, {train_blocks.shape[0]}) (the train blocks)")
        index = index[:need]
    ids = torch.from_numpy(np.ascontiguousarray(train_blocks[index]))
    return _Rows({"input_ids": ids, "labels": ids})


def _mlm_columns(name: str, batches, batch_size: int | None, vocab_size: int) -> dict[str, torch.Tensor]:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"{name} must be a non-empty list of batch dicts (input_ids, labels, attention_mask ...)")
    columns: dict[str, list] = {}
    for s, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            raise ValueError(f"{name}[{s}] must be a dict with input_ids and labels")
        if "next_sentence_label" in batch:
            raise ValueError(f"{name}[{s}] has next_sentence_label: the reference is a masked-LM model only "
                             "(no next-sentence head)")
        ids = batch["input_ids"]
        rows = batch_size if batch_size is not None else ids.shape[0]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != rows:
            raise ValueError(f"{name}[{s}]['input_ids'] must be a ({rows}, seq_len) tensor, "
                             f"got {tuple(getattr(ids, 'shape', ()))}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"{name}[{s}] holds token ids outside the vocabulary [0, {vocab_size})")
        keys = [k for k in _MLM_KEYS if k in batch]
        if s and sorted(keys) != sorted(columns):
            raise ValueError(f"{name}[{s}] has keys {sorted(keys)}, {name}[0] has {sorted(columns)}")
        for k in keys:
            if batch[k].shape != ids.shape:
                raise ValueError(f"{name}[{s}]['{k}'] has shape {tuple(batch[k].shape)}, "
                                 f"input_ids {tuple(ids.shape)}")
            columns.setdefault(k, []).append(batch[k].long())
    out = {k: torch.cat(v) for k, v in columns.items()}
    if len({v.shape[1] for v in out.values()}) != 1:
        raise ValueError(f"the batches of {name} must all have one sequence length")
    return out


# --------------------------------------------------------------- training --

def train_reference(family: str, config: dict, train_blocks: np.ndarray | None, val_blocks: np.ndarray | None, *,
                    steps: int, batch_size: int, lr: float, warmup_steps: int, weight_decay: float,
                    grad_clip: float, seed: int, min_lr_ratio: float = 0.1, eval_batch_size: int | None = None,
                    mlm_batches: list[dict] | None = None, mlm_val_batches: list[dict] | None = None,
                    order: np.ndarray | None = None, init_dir: str | Path | None = None,
                    adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                    use_cpu: bool | None = None, progress: bool = False) -> dict:
    """Train the transformers equivalent of an llmkit preset with transformers' Trainer.

    Args:
        family: "gpt" (causal LM on ``train_blocks``) or "bert" (masked LM on
            ``mlm_batches``).
        config: the llmkit config as a dict (``dataclasses.asdict`` of a
            GPTConfig / BertConfig).
        train_blocks: (N, L) int token ids (gpt; unused for bert).
        val_blocks: (M, L) int token ids: the validation loss of gpt (unused
            for bert, which scores ``mlm_val_batches``).
        steps, batch_size, lr, warmup_steps, weight_decay, grad_clip, seed:
            the Trainer's max_steps, per-device batch size, peak learning rate,
            linear warmup, AdamW weight decay, max_grad_norm (0: none), seed /
            data_seed. The schedule is "cosine_with_min_lr" down to
            ``lr * min_lr_ratio``.
        eval_batch_size: blocks per forward of the validation loop (default
            batch_size).
        mlm_batches: bert: one batch dict per step ((batch_size, L) tensors
            input_ids, labels with -100 at unscored positions, optional
            attention_mask / token_type_ids), consumed in this order.
        mlm_val_batches: bert: the masked validation batches.
        order: gpt: indices into train_blocks in the order they are consumed
            (at least steps * batch_size of them); None: 0, 1, 2, ... wrapping.
        init_dir: start from this local checkpoint's weights (e.g. llmkit's
            ``to_hf`` of the llmkit model's initial state) instead of
            transformers' own initialisation.
        adam_betas, adam_eps: the Trainer's adam_beta1 / adam_beta2 / adam_epsilon.
        use_cpu: None: the CPU unless CUDA is available.
        progress: the Trainer's progress bar.

    Returns a dict: val_loss (token-weighted mean cross-entropy over every
    validation target, computed here in eval mode, not trainer.evaluate's
    mean of batch means), train_losses (the loss of each step, as the Trainer
    logs it), tokens_per_s (steps * batch_size * L / train_seconds),
    train_seconds (wall time from the Trainer's on_train_begin to
    on_train_end: optimizer steps and logging, no evaluation), n_params
    (distinct parameters), torch_threads (torch's intra-op threads during
    training, as the caller left them).
    """
    import transformers

    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps <= steps):
        raise ValueError(f"warmup_steps must be an int in [0, steps={steps}], got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be a positive int, got {eval_batch_size!r}")

    hf = hf_config_for(family, config)
    vocab_size = hf["vocab_size"]
    if family == "gpt":
        if mlm_batches is not None or mlm_val_batches is not None:
            raise ValueError("mlm_batches / mlm_val_batches are for family 'bert'")
        train_blocks = _check_blocks("train_blocks", train_blocks, vocab_size)
        val_blocks = _check_blocks("val_blocks", val_blocks, vocab_size)
        limit = hf["n_positions"] if hf["model_type"] == "gpt2" else hf["max_position_embeddings"]
        if train_blocks.shape[1] > limit or val_blocks.shape[1] > limit:
            raise ValueError(f"blocks of {max(train_blocks.shape[1], val_blocks.shape[1])} tokens exceed the "
                             f"model's block_size ({limit})")
        dataset = _clm_dataset(train_blocks, order, steps, batch_size)
        val_columns = {"input_ids": torch.from_numpy(np.ascontiguousarray(val_blocks))}
    else:
        if mlm_batches is None or mlm_val_batches is None:
            raise ValueError("family 'bert' needs mlm_batches (one masked batch per step) and mlm_val_batches: "
                             "the caller masks, so both contenders see identical masks")
        if len(mlm_batches) != steps:
            raise ValueError(f"mlm_batches has {len(mlm_batches)} batches for {steps} steps")
        if order is not None:
            raise ValueError("order is for family 'gpt' (mlm_batches are consumed in their own order)")
        dataset = _Rows(_mlm_columns("mlm_batches", mlm_batches, batch_size, vocab_size))
        val_columns = _mlm_columns("mlm_val_batches", mlm_val_batches, None, vocab_size)
        limit = hf["max_position_embeddings"] - (hf["pad_token_id"] + 1 if hf["model_type"] != "bert" else 0)
        if dataset.columns["input_ids"].shape[1] > limit:
            raise ValueError(f"sequences of {dataset.columns['input_ids'].shape[1]} tokens exceed the model's "
                             f"{limit} positions")
    seq_len = dataset.columns["input_ids"].shape[1]
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()

    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # config notes are noise in a benchmark's output
    if not progress:
        transformers.utils.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    try:
        return _train(family, config, init_dir, dataset, val_columns, seq_len, steps, batch_size, lr,
                      warmup_steps, weight_decay, grad_clip, seed, min_lr_ratio, eval_batch_size,
                      adam_betas, adam_eps, use_cpu, progress)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        torch.set_num_threads(threads)  # whatever the Trainer did, the caller's setting stays


def _train(family, config, init_dir, dataset, val_columns, seq_len, steps, batch_size, lr, warmup_steps,
           weight_decay, grad_clip, seed, min_lr_ratio, eval_batch_size, adam_betas, adam_eps, use_cpu,
           progress) -> dict:
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    torch.manual_seed(seed)
    model = build_reference_model(family, config, init_dir)
    if family == "gpt" and getattr(model, "loss_type", None) is None:
        # GPT2LMHeadModel's class name matches no loss type, so the Trainer would count all B * L labels
        # as targets instead of the B * (L - 1) shifted ones and log (and train on) the loss times
        # (L - 1) / L. The model computes ForCausalLM's loss anyway; saying so fixes the count.
        model.loss_type = "ForCausalLM"

    losses: list[float] = []
    clock: dict[str, float] = {}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["threads"] = torch.get_num_threads()
            clock["begin"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    scheduler = dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": min_lr_ratio})
    with tempfile.TemporaryDirectory(prefix="llmkit-bench-hf-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
            adam_beta1=adam_betas[0], adam_beta2=adam_betas[1], adam_epsilon=adam_eps,
            max_grad_norm=grad_clip or 0.0, seed=seed, data_seed=seed, train_sampling_strategy="sequential",
            dataloader_drop_last=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="steps",
            logging_steps=1, use_cpu=use_cpu, disable_tqdm=not progress, torch_compile=False,
            remove_unused_columns=False, **scheduler)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Recorder()])
        # With the bar off, PrinterCallback would print every step's logs; the bar is the only output wanted.
        trainer.remove_callback(PrinterCallback)
        if not progress:
            trainer.remove_callback(ProgressCallback)
        trainer.train()
        model = trainer.model

    if len(losses) != steps:
        raise RuntimeError(f"the Trainer logged {len(losses)} step losses for {steps} steps")
    seconds = clock["end"] - clock["begin"]
    val_loss = _validation_loss(family, model, val_columns, eval_batch_size)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return dict(val_loss=val_loss, train_losses=losses, tokens_per_s=steps * batch_size * seq_len / seconds,
                train_seconds=seconds, n_params=n_params, torch_threads=clock["threads"],
                transformers_version=transformers.__version__)


@torch.no_grad()
def _validation_loss(family: str, model, columns: dict[str, torch.Tensor], batch_size: int) -> float:
    """Token-weighted mean cross-entropy over every validation target (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = columns["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in columns.items()}
        if family == "gpt":
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1]
            targets = ids[:, 1:]
        else:
            targets = batch.pop("labels")
            logits = model(**batch).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("the validation set has no scored tokens (every label is -100)")
    return total / count
