"""Held-out metrics of a model in PyTorch: accuracy (classification), loss and perplexity (causal LM).

Training evaluates with it, and the exporter checks its graphs against it.
"""

from __future__ import annotations

import math

import torch

from qelalora.base.footprint import release_free_heap

from ..data.batches import eval_batches


@torch.no_grad()
def evaluate(model, examples: list[dict], task: str, batch_size: int, pad_id: int, device, limit=None) -> dict:
    """Accuracy (classification) or token-weighted loss and perplexity (causal LM).

    The C heap's free pages go back to the system first: training steps leave their freed activation blocks
    there, and evaluation's own peak (a causal LM's logits) would otherwise sit on top of them."""
    if not examples:
        return {}
    release_free_heap()
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = tokens = 0.0
    for batch in eval_batches(examples, batch_size, pad_id, limit):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch) if task == "seq-cls" else model(**batch, use_cache=False)  # no cache: nothing reads it
        if task == "seq-cls":
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            total += batch["labels"].numel()
        else:
            n = (batch["labels"][:, 1:] != -100).sum().item()
            loss_sum += out.loss.item() * n
            tokens += n
    model.train(was_training)
    if task == "seq-cls":
        return {"accuracy": correct / total, "examples": total}
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": int(tokens)}
