"""Setting up and running ElaLoRA training: plan ranks from the budget, wrap, train.

One step is: forward, task loss + orthogonality regulariser, backward,
optimiser step, importance update and (when due) a rank round, zero_grad,
LR scheduler step. Rank rounds never touch the optimiser's param groups or
the scheduler, so the LR follows its schedule whatever the ranks do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .budget import LayerShape, OptimizerCost, RankPlan, head_bytes, plan_initial_rank
from .config import ElaLoRAConfig
from .elastic import ElasticRanks
from .layer import ElaLoRALinear, base_weight_shape
from .models import wrap_linears

LossFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class TrainState:
    model: nn.Module
    layers: dict[str, ElaLoRALinear]
    head_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ranks: ElasticRanks
    rank_plan: RankPlan
    gamma: float
    step: int = 0

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.adapter_params()] + self.head_params


def build_optimizer(params: Sequence[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0, foreach=None):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        # min_8bit_size=0: every tensor gets 8-bit state, so its bytes are one exact formula.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)
    raise ValueError(f"unknown optimiser {name!r}; choose 'adamw' or 'adamw8bit'")


def target_shapes(model: nn.Module, paths: Sequence[str]) -> list[LayerShape]:
    """(d_in, d_out) of each target linear (works on the meta device too)."""
    shapes = []
    for path in paths:
        d_out, d_in = base_weight_shape(model.get_submodule(path))
        shapes.append(LayerShape(path, d_in, d_out))
    return shapes


def plan_ranks(shapes: Sequence[LayerShape], head_numels: Sequence[int], cfg: ElaLoRAConfig) -> tuple[OptimizerCost, int, RankPlan]:
    """The optimiser's cost model, the fixed bytes (heads + shared state) and the initial rank plan."""
    opt_cost = OptimizerCost(cfg.optimizer)
    fixed = head_bytes(head_numels, opt_cost) + opt_cost.shared_bytes()
    return opt_cost, fixed, plan_initial_rank(shapes, cfg.budget_bytes, opt_cost, fixed, cfg.rank, cfg.max_init_rank, cfg.r_min)


def prepare_training(
    model: nn.Module,
    paths: Sequence[str],
    heads: Sequence[nn.Parameter],
    cfg: ElaLoRAConfig,
    total_steps: int,
    lr: float,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    foreach: bool | None = None,
) -> TrainState:
    """Plan initial ranks from the budget, wrap the target linears, build optimiser and schedules.

    Seeds torch's global RNG (dropout) with `seed`; seed it before loading a
    model too when the model has freshly initialised parts (a new head).
    """
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)

    shapes = target_shapes(model, paths)
    opt_cost, fixed, rank_plan = plan_ranks(shapes, [p.numel() for p in heads], cfg)
    layers = wrap_linears(model, paths, rank_plan.rank, cfg.alpha, cfg.dropout, cfg.init_std, seed=seed)
    heads = list(heads)
    params = [p for layer in layers.values() for p in layer.adapter_params()] + heads
    optimizer = build_optimizer(params, cfg.optimizer, lr, weight_decay, foreach)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    ranks = ElasticRanks(
        layers=layers,
        shapes=shapes,
        schedule=cfg.schedule(total_steps),
        budget_bytes=cfg.budget_bytes,
        opt_cost=opt_cost,
        fixed_bytes=fixed,
        k=cfg.k,
        r_min=cfg.r_min,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        seed=seed,
    )
    return TrainState(model, layers, heads, optimizer, scheduler, ranks, rank_plan, cfg.gamma)


def orthogonality_regulariser(layers: Sequence[ElaLoRALinear], gamma: float) -> torch.Tensor | None:
    live = [layer for layer in layers if layer.rank > 0]
    if gamma == 0 or not live:
        return None
    return gamma * torch.stack([layer.orthogonality_penalty() for layer in live]).mean()


def train_step(state: TrainState, batch, loss_fn: LossFn) -> float:
    """One optimiser step; returns the task loss."""
    state.model.train()
    loss = loss_fn(state.model, batch)
    reg = orthogonality_regulariser(list(state.layers.values()), state.gamma)
    total = loss if reg is None else loss + reg
    total.backward()
    state.optimizer.step()
    state.step += 1
    state.ranks.after_step(state.step, state.optimizer)
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return loss.item()


def train(
    state: TrainState,
    batches: Iterator,
    steps: int,
    loss_fn: LossFn,
    on_step: Callable[[TrainState, float], None] | None = None,
) -> list[float]:
    """Run `steps` optimiser steps; `on_step(state, loss)` is called after each."""
    losses = []
    for _ in range(steps):
        loss = train_step(state, next(batches), loss_fn)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"loss became {loss} at step {state.step}")
        losses.append(loss)
        if on_step is not None:
            on_step(state, loss)
    return losses
