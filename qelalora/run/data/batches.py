"""Batches for training and evaluation: padding, resumable shuffled streams, length-ordered evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch (labels -100 on padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in examples[0] and isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            seq = e.get("labels", e["input_ids"])
            labels[i, : len(seq)] = torch.tensor(seq)
        batch["labels"] = labels
    return batch


class BatchStream:
    """Endless shuffled batches; its position (epoch, offset) is checkpointed.

    With `shards` > 1 (several processes), the stream draws global batches of
    `batch_size` x `shards` examples in the same seeded order as one process
    would, and gives this process its `shard` of each; the position counts
    global examples, so a run can resume with another number of processes.
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int, shard: int = 0, shards: int = 1):
        self.examples, self.pad_id, self.seed = examples, pad_id, seed
        self.batch_size, self.shard, self.per_shard = batch_size * shards, shard, batch_size
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        picked = []
        while len(picked) < self.batch_size:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation()
            take = self._order[self.offset : self.offset + self.batch_size - len(picked)]
            self.offset += len(take)
            picked.extend(take)
        mine = picked[self.shard * self.per_shard : (self.shard + 1) * self.per_shard]
        return collate([self.examples[i] for i in mine], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def eval_batches(examples: list[dict], batch_size: int, pad_id: int, limit: int | None = None) -> Iterator[dict]:
    """Batches of the first `limit` x `batch_size` examples (all without a limit), shortest first.

    Ordering by length pads each batch only to its neighbours' length: the
    metrics are sums over examples, so the order does not change them, and
    on short-text sets it halves the tokens the model runs on.
    """
    n = len(examples) if limit is None else min(len(examples), limit * batch_size)
    order = sorted(range(n), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, n, batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


