"""The initial rank plan: the target layers' shapes and the byte budget in, one rank for every layer out.

The memory plan makes it on a weightless model before training; training makes the same plan on the loaded one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from qelalora.method.base_weight import base_weight_shape
from qelalora.method.budget import LayerShape, RankPlan, StateCost, head_bytes, plan_initial_rank
from qelalora.method.config import ElaLoRAConfig


def target_shapes(model: nn.Module, paths: Sequence[str]) -> list[LayerShape]:
    """(d_in, d_out) of each target linear (works on the meta device too)."""
    shapes = []
    for path in paths:
        d_out, d_in = base_weight_shape(model.get_submodule(path))
        shapes.append(LayerShape(path, d_in, d_out))
    return shapes


def plan_ranks(shapes: Sequence[LayerShape], head_numels: Sequence[int], cfg: ElaLoRAConfig) -> tuple[StateCost, int, RankPlan]:
    """The optimiser's cost model, the fixed bytes (heads + shared state) and the initial rank plan."""
    cost = StateCost(cfg.optimizer, cfg.score_state)
    fixed = head_bytes(head_numels, cost) + cost.shared_bytes()
    return cost, fixed, plan_initial_rank(shapes, cfg.budget_bytes, cost, fixed, cfg.rank, cfg.max_init_rank, cfg.r_min)
