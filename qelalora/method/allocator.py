"""Rank decisions: when a round runs, and which triplets go or come (spec 3-5).

Pure: every function here reads scores and shapes and returns a plan; nothing
touches a model or an optimiser (`qelalora.method.resizer` applies plans). Ties are
broken by (layer index, triplet index), so every process of a distributed run
that holds the same scores makes the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .budget import LayerShape, StateCost, adapter_bytes, layer_bytes


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


def _candidate_pool(layers: Sequence[LayerView], k: int, r_min: int, weights: Sequence[float]) -> list[_Candidate]:
    """Each layer's k weakest triplets; those that would take it below r_min are not prunable."""
    pool = []
    for li, view in enumerate(layers):
        if view.rank == 0:
            continue  # a layer at rank 0 has left the model for good
        scores = [s * weights[li] for s in view.scores.tolist()]
        weakest = sorted(range(view.rank), key=lambda t: (scores[t], t))[: min(k, view.rank)]
        for position, t in enumerate(weakest):
            pool.append(_Candidate(scores[t], li, t, prunable=position < view.rank - r_min))
    return pool


def _growth_order(layers: Sequence[LayerView], pool: list[_Candidate], weights: Sequence[float]) -> list[int]:
    """Layer indices in the order growth slots are offered: the pool's entries from the
    strongest down, then every other live triplet from the strongest down."""
    in_pool = {(c.layer, c.triplet) for c in pool}
    rest = [
        _Candidate(score * weights[li], li, t, prunable=False)
        for li, view in enumerate(layers)
        for t, score in enumerate(view.scores.tolist())
        if (li, t) not in in_pool
    ]
    key = lambda c: (-c.score, c.layer, c.triplet)  # noqa: E731
    return [c.layer for c in sorted(pool, key=key) + sorted(rest, key=key)]


def _one_more_triplet_bytes(shape: LayerShape, rank: int, cost: StateCost) -> int:
    return layer_bytes(shape.d_in, shape.d_out, rank + 1, cost) - layer_bytes(shape.d_in, shape.d_out, rank, cost)


def plan_round(
    layers: Sequence[LayerView],
    b: int,
    k: int,
    r_min: int,
    budget_bytes: int,
    cost: StateCost,
    fixed_bytes: int,
    max_total_rank: int | None = None,
    per_byte: bool = False,
) -> RoundPlan:
    """One ADJUST round: prune the b weakest pool entries, then offer each freed slot for growth.

    Triplets are ranked by score, or with `per_byte` by score per byte of training
    state they hold: under a byte budget a triplet of a wide layer (an FFN's, say
    2.5x an attention triplet's bytes) must be worth that much more to be kept or
    grown, the greedy answer to the knapsack the budget poses.

    A slot goes to the owner of the strongest pool entry that can take it, then
    down the pool, then to the other triplets by score: a layer pruned in this
    round, already grown k times, at min(d_in, d_out), or whose next triplet
    would take the adapter state past `budget_bytes` (or the total rank past
    `max_total_rank`: the reference code's rank-count budget, kept for
    comparison) passes the slot on. A slot that no layer can take is given back:
    its triplet is not pruned after all. So total rank does not drain away.
    """
    shapes = [v.shape for v in layers]
    ranks = [v.rank for v in layers]
    plan = RoundPlan(bytes_before=adapter_bytes(shapes, ranks, cost, fixed_bytes))
    # A triplet's bytes are proportional to its elements (a row of A, one E, a column of B) for every optimiser,
    # up to the 8-bit optimiser's block rounding, which would make alike layers at different ranks disagree.
    weights = [1.0 / (v.shape.d_in + v.shape.d_out + 1) if per_byte else 1.0 for v in layers]
    pool = _candidate_pool(layers, k, r_min, weights)
    if b <= 0 or not pool:
        plan.bytes_after = plan.bytes_before
        return plan

    pruned = _prune(plan, pool, b)
    room = _Room(shapes, plan.new_ranks(ranks), budget_bytes, cost, fixed_bytes, max_total_rank)
    slots = _grow(plan, room, _growth_order(layers, pool, weights), len(pruned), k)
    _give_back(plan, room, pruned, slots)
    plan.bytes_after = room.used
    return plan


def _prune(plan: RoundPlan, pool: list[_Candidate], b: int) -> list[_Candidate]:
    """The b weakest prunable pool entries, recorded in `plan` (triplet indices in order per layer)."""
    ascending = sorted(pool, key=lambda c: (c.score, c.layer, c.triplet))
    pruned = [c for c in ascending if c.prunable][:b]
    for cand in pruned:
        plan.prune.setdefault(cand.layer, []).append(cand.triplet)
    for triplets in plan.prune.values():
        triplets.sort()
    return pruned


class _Room:
    """The ranks after pruning and the bytes they use; a layer gets one more triplet only while the budget (and
    the optional total-rank cap) allows it."""

    def __init__(self, shapes: Sequence[LayerShape], ranks: list[int], budget_bytes: int, cost: StateCost,
                 fixed_bytes: int, max_total_rank: int | None):
        self.shapes, self.ranks, self.budget_bytes, self.cost = shapes, ranks, budget_bytes, cost
        self.max_total_rank = max_total_rank
        self.used = adapter_bytes(shapes, ranks, cost, fixed_bytes)

    def add_triplet(self, li: int) -> bool:
        extra = _one_more_triplet_bytes(self.shapes[li], self.ranks[li], self.cost)
        if self.used + extra > self.budget_bytes or (self.max_total_rank is not None and sum(self.ranks) >= self.max_total_rank):
            return False
        self.used += extra
        self.ranks[li] += 1
        return True


def _grow(plan: RoundPlan, room: _Room, order: list[int], slots: int, k: int) -> int:
    """Offer the freed slots down `order`; returns the slots no layer took."""
    while slots:  # a layer with fewer than k triplets in the order may take a second slot on a later pass
        granted = 0
        for li in order:
            if slots == 0:
                break
            if li in plan.prune or plan.grow.get(li, 0) >= k or room.ranks[li] >= room.shapes[li].max_rank:
                continue
            if not room.add_triplet(li):
                continue
            plan.grow[li] = plan.grow.get(li, 0) + 1
            slots -= 1
            granted += 1
        if not granted:
            break
    return slots


def _give_back(plan: RoundPlan, room: _Room, pruned: list[_Candidate], slots: int) -> None:
    """A slot no layer could take goes back to the triplet it came from, strongest pruned first: a round never
    lowers total rank just because the pruned layers were the only ones able to grow."""
    for cand in reversed(pruned):
        if slots == 0:
            break
        if not room.add_triplet(cand.layer):
            continue
        plan.prune[cand.layer].remove(cand.triplet)
        if not plan.prune[cand.layer]:
            del plan.prune[cand.layer]
        slots -= 1
