"""Small builders shared by the tests."""

import torch
import torch.nn as nn

from qelalora.method.layer import ElaLoRALinear


def lm_batches(vocab: int, batch: int = 4, seq: int = 16, seed: int = 1):
    """Endless random causal-LM batches (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield {"input_ids": ids, "labels": ids}


def cls_batches(vocab: int, batch: int = 8, seq: int = 12, seed: int = 1):
    """Endless random classification batches whose label is a function of the first token."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] % 2).long()}


def hf_loss(model, batch):
    return model(**batch).loss


def set_scores(layer: ElaLoRALinear, scores) -> None:
    """Make triplet i score exactly scores[i] (E carries it; A and B score zero)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    ibar, ubar = layer.score_buffers("lora_E")
    ibar.copy_(scores)
    ubar.fill_(1.0)
    for name in ("lora_A", "lora_B"):
        for buf in layer.score_buffers(name):
            buf.zero_()


def plain_layer(d_in=16, d_out=12, rank=4, seed=0) -> ElaLoRALinear:
    torch.manual_seed(seed)
    layer = ElaLoRALinear(nn.Linear(d_in, d_out), rank, alpha=8.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    return layer
