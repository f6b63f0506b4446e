"""The per-step hook that ties scores, allocator and resizer together.

`ElasticRanks.after_step(step, optimizer)` is called once per optimiser step,
after `optimizer.step()` and before the gradients are cleared. It folds the
gradients into the importance EMAs (until stabilisation), runs a rank round
when the schedule says so, and records what every round did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .allocator import LayerView, RoundPlan, plan_round
from .budget import LayerShape, StateCost, adapter_bytes
from .importance import triplet_scores, update_importance
from .layer import ElaLoRALinear
from .resizer import apply_plan
from .schedule import Schedule


@dataclass
class RoundRecord:
    step: int
    b: int
    pruned: dict[str, int]
    grown: dict[str, int]
    ranks: dict[str, int]
    adapter_bytes: int
    budget_bytes: int


@dataclass
class ElasticRanks:
    layers: dict[str, ElaLoRALinear]
    shapes: Sequence[LayerShape]
    schedule: Schedule
    budget_bytes: int
    cost: StateCost
    fixed_bytes: int  # heads + optimiser state shared by all parameters
    k: int = 2
    r_min: int = 1
    per_byte: bool = False  # weigh each triplet's score by the bytes it holds (see plan_round)
    beta1: float = 0.85
    beta2: float = 0.85
    seed: int = 0
    max_total_rank: int | None = None  # optional rank-count cap on top of the byte budget
    history: list[RoundRecord] = field(default_factory=list)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self._layer_list = list(self.layers.values())
        self.initial_ranks = self.rank_pattern()

    def rank_pattern(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def total_rank(self) -> int:
        return sum(layer.rank for layer in self._layer_list)

    def adapter_bytes(self) -> int:
        return adapter_bytes(self.shapes, [l.rank for l in self._layer_list], self.cost, self.fixed_bytes)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> RoundRecord | None:
        if not self.schedule.updates_scores(step):
            return None
        update_importance(self._layer_list, self.beta1, self.beta2)
        b = self.schedule.round_size(step)
        return None if b is None else self.run_round(step, b, optimizer)

    def plan(self, b: int) -> RoundPlan:
        views = [LayerView(s, l.rank, triplet_scores(l)) for s, l in zip(self.shapes, self._layer_list)]
        return plan_round(views, b, self.k, self.r_min, self.budget_bytes, self.cost, self.fixed_bytes,
                          self.max_total_rank, self.per_byte)

    def run_round(self, step: int, b: int, optimizer: torch.optim.Optimizer | None) -> RoundRecord:
        plan = self.plan(b)
        apply_plan(self._layer_list, plan, optimizer, self.generator)
        names = list(self.layers)
        record = RoundRecord(
            step=step,
            b=b,
            pruned={names[i]: len(t) for i, t in plan.prune.items()},
            grown={names[i]: n for i, n in plan.grow.items()},
            ranks=self.rank_pattern(),
            adapter_bytes=plan.bytes_after,
            budget_bytes=self.budget_bytes,
        )
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "history": [asdict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.history = [RoundRecord(**r) for r in state["history"]]
