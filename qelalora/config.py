"""ElaLoRA's method settings, with the reference code's defaults (spec sections 1-6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ElaLoRAConfig:
    budget_mb: float = 512.0  # hard cap on adapter training state, MiB
    rank: int | str = "auto"  # initial rank of every layer: "auto" = the largest that fits the budget
    max_init_rank: int = 64
    r_min: int = 1  # a layer is never pruned below this; 0 lets a layer leave the model
    alpha: float = 16.0  # s = alpha / r0
    dropout: float = 0.0
    init_std: float = 0.02
    k: int = 2  # candidates per layer per round, and the most a layer can gain in one round
    b0: int = 4  # triplets pruned per round at the start of the adjustment phase
    t_init: int | float = 0.1  # warm-up: steps, or a fraction of total steps
    t_final: int | float = 0.2  # stabilisation: steps, or a fraction of total steps
    delta: int | float = 50  # steps between rounds (or a fraction of total steps)
    beta1: float = 0.85
    beta2: float = 0.85
    gamma: float = 0.1  # orthogonality regulariser weight
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * 2**20)

    def schedule(self, total_steps: int):
        from .allocator import Schedule  # torch-free import of this module for the edge path

        return Schedule(
            total_steps=total_steps,
            t_init=steps_of(self.t_init, total_steps),
            t_final=steps_of(self.t_final, total_steps),
            delta=max(1, steps_of(self.delta, total_steps)),
            b0=self.b0,
        )


def steps_of(value: int | float, total_steps: int) -> int:
    """A step count given as an int, or as a fraction (float < 1) of the total."""
    if isinstance(value, float) and value < 1:
        return int(round(value * total_steps))
    return int(value)
