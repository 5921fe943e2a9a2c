"""What a freshly pretrained model says: greedy completions and mask filling."""
from __future__ import annotations

import torch


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 24, **sampling) -> str:
    """Continuation of `prompt`: greedy, or sampled with `sampling` (do_sample,
    temperature, top_k, top_p, seed: llmkit.generate's) for GPT; T5 decodes
    greedily from the prompt as its input."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        if type(model).__name__ == "T5":
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False) + [tokenizer.eos_token_id]],
                               device=device)
            out = model.generate(ids, max_new_tokens=max_new_tokens)
            return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
        from llmkit.generation import generate

        ids = tokenizer.encode(prompt, add_special_tokens=False)
        out = generate(model, [ids], max_new_tokens=max_new_tokens, eos_token_id=None, progress=False, **sampling)
        return prompt + tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    finally:
        model.train(was_training)


@torch.no_grad()
def mask_candidates(model, tokenizer, text: str, k: int = 3) -> list[list[str]]:
    """The model's top-`k` tokens for each mask of `text` ([MASK] or <mask>)."""
    was_training = model.training
    model.eval()
    try:
        mask = tokenizer.mask_token
        ids = tokenizer.encode(text.replace("[MASK]", mask).replace("<mask>", mask), add_special_tokens=True)
        logits = model(torch.tensor([ids], device=next(model.parameters()).device)).logits[0]
        return [[tokenizer.decode([int(t)], skip_special_tokens=False).strip() for t in logits[i].topk(k).indices]
                for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    finally:
        model.train(was_training)


@torch.no_grad()
def fill_masks(model, tokenizer, text: str) -> str:
    """`text` with each mask token (written [MASK] or <mask>) replaced by the model's top guess."""
    was_training = model.training
    model.eval()
    try:
        mask = tokenizer.mask_token
        text = text.replace("[MASK]", mask).replace("<mask>", mask)
        ids = tokenizer.encode(text, add_special_tokens=True)
        device = next(model.parameters()).device
        logits = model(torch.tensor([ids], device=device)).logits[0]
        filled = [int(logits[i].argmax()) if t == tokenizer.mask_token_id else t for i, t in enumerate(ids)]
        return tokenizer.decode(filled, skip_special_tokens=True)
    finally:
        model.train(was_training)
