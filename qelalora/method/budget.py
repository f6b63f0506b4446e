"""Byte accounting for the adapters' training state (ElaLoRA spec, section 6).

The budget covers what rank allocation controls: every trainable tensor's
value, gradient and optimiser state, plus the importance-score EMAs of each
adapter tensor. Costs are exact functions of tensor sizes for the configured
optimiser and score layout, so the planner's prediction equals what
`qelalora.method.layer.measure_adapter_bytes` reads off the real tensors. Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import UserError
from ..units import fmt_mib, mib
from .config import OPTIMIZERS, SCORE_STATES

FP32 = 4
BF16 = 2
BNB_BLOCK = 256  # bitsandbytes' blockwise optimiser state block size
BNB_QMAP_BYTES = 2 * 256 * FP32  # the two shared quantisation maps of an 8-bit optimiser


@dataclass(frozen=True)
class StateCost:
    """Bytes the training state keeps per trainable tensor: optimiser moments and score EMAs.

    `score_state` is where the two importance EMAs (sensitivity, uncertainty) live:
    "element" keeps fp32 EMAs per adapter element (the spec's formula), "element-bf16"
    the same in bf16, "triplet" one pair per triplet for each of A, E and B.
    """

    optimizer: str
    score_state: str = "element"

    def state_bytes(self, n: int) -> int:
        if self.optimizer == "adamw":
            return 2 * FP32 * n + FP32  # exp_avg, exp_avg_sq, and the fp32 `step` scalar
        if self.optimizer == "adamw8bit":
            return 2 * n + 2 * FP32 * math.ceil(n / BNB_BLOCK)  # uint8 moments + per-block absmax
        raise ValueError(f"unknown optimiser {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")

    def shared_bytes(self) -> int:
        """State shared by all parameters (bitsandbytes' quantisation maps)."""
        return BNB_QMAP_BYTES if self.optimizer == "adamw8bit" else 0

    def score_bytes(self, n: int, rank: int) -> int:
        """The two score EMAs of one adapter tensor of n elements holding `rank` triplets."""
        if self.score_state == "element":
            return 2 * FP32 * n
        if self.score_state == "element-bf16":
            return 2 * BF16 * n
        if self.score_state == "triplet":
            return 2 * FP32 * rank
        raise ValueError(f"unknown score_state {self.score_state!r}; choose one of {', '.join(SCORE_STATES)}")


def tensor_train_bytes(n: int, cost: StateCost) -> int:
    """Value + gradient + optimiser state of an n-element fp32 tensor."""
    return 2 * FP32 * n + cost.state_bytes(n)


def layer_bytes(d_in: int, d_out: int, rank: int, cost: StateCost) -> int:
    """Training-state bytes of one ElaLoRA layer at `rank`."""
    return sum(tensor_train_bytes(n, cost) + cost.score_bytes(n, rank) for n in (rank * d_in, rank, d_out * rank))


def head_bytes(numels: Iterable[int], cost: StateCost) -> int:
    """Training-state bytes of trained non-adapter tensors (e.g. a classifier head)."""
    return sum(tensor_train_bytes(n, cost) for n in numels)


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_in: int
    d_out: int

    @property
    def max_rank(self) -> int:
        return min(self.d_in, self.d_out)


def adapter_bytes(shapes: Sequence[LayerShape], ranks: Sequence[int], cost: StateCost, fixed: int) -> int:
    """Predicted adapter-state bytes for a rank pattern (`fixed`: heads + shared state)."""
    return fixed + sum(layer_bytes(s.d_in, s.d_out, r, cost) for s, r in zip(shapes, ranks))


class BudgetError(UserError):
    """The budget cannot hold the requested adapters."""


@dataclass(frozen=True)
class RankPlan:
    """Initial ranks chosen from the budget, and why."""

    rank: int
    binding: str  # which limit set the rank: "budget", "max_init_rank", "layer width", "requested"
    adapter_bytes: int
    budget_bytes: int
    min_budget_bytes: int

    @property
    def budget_used(self) -> float:
        return self.adapter_bytes / self.budget_bytes


def plan_initial_rank(
    shapes: Sequence[LayerShape],
    budget_bytes: int,
    cost: StateCost,
    fixed: int,
    rank: int | str = "auto",
    max_init_rank: int = 64,
    r_min: int = 1,
) -> RankPlan:
    """The uniform initial rank r0 for every layer, from the byte budget.

    `rank="auto"`: the largest r0 that fits, capped by `max_init_rank` and by the
    narrowest layer's min(d_in, d_out). `rank=N`: N, if it fits.
    """
    if not shapes:
        raise BudgetError("no target layers were found to adapt")
    floor_rank = max(r_min, 1)
    min_budget = adapter_bytes(shapes, [floor_rank] * len(shapes), cost, fixed)
    if min_budget > budget_bytes:
        need = math.ceil(mib(min_budget) * 100) / 100  # rounded up, so that it really is enough
        have = math.floor(mib(budget_bytes) * 100) / 100
        raise BudgetError(
            f"a budget of {have:.2f} MiB cannot give each of the {len(shapes)} target layers "
            f"rank {floor_rank}: the smallest workable budget is {need:.2f} MiB "
            f"(--budget-mb {need:.2f}); raise the budget or adapt fewer layers"
        )
    width_cap = min(s.max_rank for s in shapes)
    if rank != "auto":
        rank = int(rank)
        if rank > width_cap:
            raise BudgetError(f"rank {rank} exceeds the narrowest target layer's min(d_in, d_out) = {width_cap}")
        used = adapter_bytes(shapes, [rank] * len(shapes), cost, fixed)
        if used > budget_bytes:
            raise BudgetError(
                f"rank {rank} needs {fmt_mib(used, 2)} of adapter state but the budget is "
                f"{fmt_mib(budget_bytes, 2)}; lower the rank or use rank: auto"
            )
        return RankPlan(rank, "requested", used, budget_bytes, min_budget)
    cap = min(max_init_rank, width_cap)
    best = floor_rank
    # Costs grow monotonically with rank: find the largest fitting rank by bisection.
    lo, hi = floor_rank, cap
    while lo <= hi:
        mid = (lo + hi) // 2
        if adapter_bytes(shapes, [mid] * len(shapes), cost, fixed) <= budget_bytes:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if adapter_bytes(shapes, [best + 1] * len(shapes), cost, fixed) > budget_bytes:
        binding = "budget"  # even where a cap binds too, the budget alone would stop here
    else:
        binding = "max_init_rank" if max_init_rank <= width_cap else "layer width"
    used = adapter_bytes(shapes, [best] * len(shapes), cost, fixed)
    return RankPlan(best, binding, used, budget_bytes, min_budget)


