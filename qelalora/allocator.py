"""Rank decisions: when a round runs, and which triplets go or come (spec 3-5).

Pure: every function here reads scores and shapes and returns a plan; nothing
touches a model or an optimiser (`qelalora.resizer` applies plans). Ties are
broken by (layer index, triplet index), so every process of a distributed run
that holds the same scores makes the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .budget import LayerShape, OptimizerCost, adapter_bytes, layer_bytes


@dataclass(frozen=True)
class Schedule:
    """Steps are counted from 1 (the step just taken by the optimiser)."""

    total_steps: int
    t_init: int  # warm-up: no rank changes up to and including this step
    t_final: int  # stabilisation: the last t_final steps change nothing
    delta: int  # steps between rounds
    b0: int  # triplets pruned (and offered for growth) per round at the start

    def __post_init__(self):
        if self.delta < 1:
            raise ValueError("delta must be >= 1")
        if self.t_init < 0 or self.t_final < 0 or self.b0 < 0:
            raise ValueError("t_init, t_final and b0 must be >= 0")
        if self.t_init + self.t_final >= self.total_steps:
            raise ValueError(
                f"warm-up ({self.t_init}) + stabilisation ({self.t_final}) steps leave no adjustment phase "
                f"in {self.total_steps} total steps"
            )

    @property
    def stabilisation_start(self) -> int:
        return self.total_steps - self.t_final

    def updates_scores(self, step: int) -> bool:
        return step < self.stabilisation_start

    def round_size(self, step: int) -> int | None:
        """b_t if a round runs after `step`, else None. b_t = round(b0 (1 - p^3))."""
        if not (self.t_init < step < self.stabilisation_start) or (step - self.t_init) % self.delta:
            return None
        progress = (step - self.t_init) / (self.stabilisation_start - self.t_init)
        return math.floor(self.b0 * (1.0 - progress**3) + 0.5)


@dataclass(frozen=True)
class LayerView:
    """What the allocator sees of one adapted layer."""

    shape: LayerShape
    rank: int
    scores: torch.Tensor  # [rank]


@dataclass
class RoundPlan:
    prune: dict[int, list[int]] = field(default_factory=dict)  # layer index -> triplet indices to remove
    grow: dict[int, int] = field(default_factory=dict)  # layer index -> triplets to append
    bytes_before: int = 0
    bytes_after: int = 0

    def new_ranks(self, ranks: Sequence[int]) -> list[int]:
        return [r - len(self.prune.get(i, ())) + self.grow.get(i, 0) for i, r in enumerate(ranks)]

    @property
    def is_empty(self) -> bool:
        return not self.prune and not self.grow


@dataclass(frozen=True)
class _Candidate:
    score: float
    layer: int
    triplet: int
    prunable: bool


def _candidate_pool(layers: Sequence[LayerView], k: int, r_min: int) -> list[_Candidate]:
    """Each layer's k weakest triplets; those that would take it below r_min are not prunable."""
    pool = []
    for li, view in enumerate(layers):
        if view.rank == 0:
            continue  # a layer at rank 0 has left the model for good
        scores = view.scores.tolist()
        weakest = sorted(range(view.rank), key=lambda t: (scores[t], t))[: min(k, view.rank)]
        for position, t in enumerate(weakest):
            pool.append(_Candidate(scores[t], li, t, prunable=position < view.rank - r_min))
    return pool


def plan_round(
    layers: Sequence[LayerView],
    b: int,
    k: int,
    r_min: int,
    budget_bytes: int,
    opt: OptimizerCost,
    fixed_bytes: int,
    max_total_rank: int | None = None,
) -> RoundPlan:
    """One ADJUST round: prune the b weakest pool entries, grow the owners of the b strongest.

    No layer is both pruned and grown; a layer gains at most k triplets, never
    passes min(d_in, d_out), and a growth is taken only while the adapter state
    stays within `budget_bytes` (and, if given, the total rank within
    `max_total_rank`: the reference code's rank-count budget, kept for comparison).
    """
    shapes = [v.shape for v in layers]
    ranks = [v.rank for v in layers]
    plan = RoundPlan(bytes_before=adapter_bytes(shapes, ranks, opt, fixed_bytes))
    pool = _candidate_pool(layers, k, r_min)
    if b <= 0 or not pool:
        plan.bytes_after = plan.bytes_before
        return plan

    ascending = sorted(pool, key=lambda c: (c.score, c.layer, c.triplet))
    for cand in [c for c in ascending if c.prunable][:b]:
        plan.prune.setdefault(cand.layer, []).append(cand.triplet)
    for triplets in plan.prune.values():
        triplets.sort()

    new_ranks = plan.new_ranks(ranks)
    used = adapter_bytes(shapes, new_ranks, opt, fixed_bytes)
    strongest = sorted(pool, key=lambda c: (-c.score, c.layer, c.triplet))[:b]
    for cand in strongest:
        li = cand.layer
        if li in plan.prune or plan.grow.get(li, 0) >= k or new_ranks[li] >= shapes[li].max_rank:
            continue
        shape = shapes[li]
        extra = layer_bytes(shape.d_in, shape.d_out, new_ranks[li] + 1, opt) - layer_bytes(
            shape.d_in, shape.d_out, new_ranks[li], opt
        )
        if used + extra > budget_bytes or (max_total_rank is not None and sum(new_ranks) >= max_total_rank):
            continue
        used += extra
        new_ranks[li] += 1
        plan.grow[li] = plan.grow.get(li, 0) + 1
    plan.bytes_after = used
    return plan
