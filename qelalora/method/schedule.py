"""When rank rounds run and how many triplets each one moves (spec 3): torch-free, so recipes validate without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
