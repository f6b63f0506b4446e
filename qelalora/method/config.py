"""ElaLoRA's method settings (spec sections 1-6 and 8).

The schedule's defaults are the reference code's. How the adapters start and
are optimised (start, scaling, regulariser, per-tensor learning rates, score
layout) are qelalora's measured defaults; `preset: reference` restores the
paper's configuration for any of those keys a recipe does not set itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import MIB
from .schedule import Schedule

# The paper's configuration: gaussian start, s = alpha / r0, the plain
# orthogonality regulariser at 0.1, one learning rate, fp32 score EMAs per element.
PRESETS: dict[str, dict] = {
    "reference": {
        "init": "gaussian",
        "init_std": 0.02,
        "scaling": "rank",
        "gamma": 0.1,
        "regulariser": "plain",
        "gamma_decay": "none",
        "lr_mult_E": 1.0,
        "lr_mult_B": 1.0,
        "score_state": "element",
        "allocation": "score",
    },
}
# The choices of the method keys (kept here, torch-free, so recipes validate without torch).
STARTS = ("gaussian", "orthonormal", "lora", "residual")  # see qelalora.method.starts
SCALINGS = ("rank", "sqrt-rank")
REGULARISER_FORMS = ("plain", "squared", "rank-normalised")
GAMMA_DECAYS = ("none", "linear")
SCORE_STATES = ("element", "element-bf16", "triplet")  # see qelalora.method.importance
ALLOCATIONS = ("score", "per-byte")  # see qelalora.method.allocator.plan_round
OPTIMIZERS = ("adamw", "adamw8bit")  # torch.optim.AdamW | bitsandbytes' AdamW8bit (see qelalora.method.budget.StateCost)


@dataclass
class ElaLoRAConfig:
    """The method's settings. The start, regulariser and score-state defaults were chosen on validation data
    against PEFT LoRA at equal adapter-state bytes (BENCHMARKS.md); `preset="reference"` gives the paper's."""

    budget_mb: float = 512.0  # hard cap on adapter training state, MiB
    rank: int | str = "auto"  # initial rank of every layer: "auto" = the largest that fits the budget
    max_init_rank: int = 64
    r_min: int = 1  # a layer is never pruned below this; 0 lets a layer leave the model
    preset: str | None = None  # "reference" = the paper's configuration for every method key not set here
    alpha: float = 16.0  # s = alpha / r0 (or alpha / sqrt(r0), see scaling)
    scaling: str = "rank"  # rank: s = alpha / r0; sqrt-rank: s = alpha / sqrt(r0) (rsLoRA)
    dropout: float = 0.0
    init: str = "lora"  # lora (B = 0, E = 1) | gaussian (the paper's) | orthonormal | residual (qelalora.method.starts)
    init_std: float = 0.02  # the gaussian start's standard deviation
    k: int = 2  # candidates per layer per round, and the most a layer can gain in one round
    allocation: str = "score"  # rounds rank triplets by score (the paper's) | per-byte: score / the triplet's bytes
    b0: int = 4  # triplets pruned per round at the start of the adjustment phase
    t_init: int | float = 0.1  # warm-up: steps, or a fraction of total steps
    t_final: int | float = 0.2  # stabilisation: steps, or a fraction of total steps
    delta: int | float = 50  # steps between rounds (or a fraction of total steps)
    beta1: float = 0.85
    beta2: float = 0.85
    gamma: float = 0.1  # orthogonality regulariser weight
    regulariser: str = "rank-normalised"  # squared Frobenius / r | squared | plain (the paper's)
    gamma_decay: str = "linear"  # linear (to 0 at the last step) | none
    lr_mult_E: float = 1.0  # E's learning rate = train.lr x this
    lr_mult_B: float = 1.0  # B's learning rate = train.lr x this
    score_state: str = "triplet"  # triplet (one EMA pair per triplet) | element (fp32 per element) | element-bf16
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * MIB)

    def gamma_at(self, step: int, total_steps: int) -> float:
        """The regulariser's weight at `step` (counted from 0 before the first update)."""
        if self.gamma_decay == "linear":
            return self.gamma * max(0.0, 1.0 - step / total_steps)
        return self.gamma

    def schedule(self, total_steps: int) -> Schedule:
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
