"""Setting up and running ElaLoRA training: plan ranks from the budget, wrap, train.

One step is: forward, task loss + orthogonality regulariser, backward,
optimiser step, importance update and (when due) a rank round, zero_grad,
LR scheduler step. Rank rounds never touch the optimiser's param groups or
the scheduler, so the LR follows its schedule whatever the ranks do. The
optimiser has one param group per kind of tensor (A, E, B, heads), so that
E and B can have their own learning-rate multipliers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from qelalora.base.checkpoint_reads import full_precision_weights
from qelalora.base.models import base_model_prefix, wrap_linears
from qelalora.method.budget import RankPlan
from qelalora.method.config import OPTIMIZERS, ElaLoRAConfig
from qelalora.method.elastic import ElasticRanks
from qelalora.method.layer import ElaLoRALinear
from qelalora.method.starts import apply_residual

from ..plan.ranks import plan_ranks, target_shapes

LossFn = Callable[[nn.Module, object], torch.Tensor]
GradientHook = Callable[[Sequence[nn.Parameter], object, float], float]
"""Called after backward with (trainable parameters, batch, task loss); returns the loss to report. Several
processes average their gradients here (run/train/distributed.py)."""
RoundHook = Callable[[int, dict[str, int]], None]
"""Called after every rank round with (step, rank pattern)."""


@dataclass
class TrainState:
    model: nn.Module
    layers: dict[str, ElaLoRALinear]
    head_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ranks: ElasticRanks
    rank_plan: RankPlan
    cfg: ElaLoRAConfig
    total_steps: int
    step: int = 0
    after_backward: GradientHook | None = None
    after_round: RoundHook | None = None

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.adapter_params()] + self.head_params


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, foreach=None):
    """AdamW or bitsandbytes' AdamW8bit over `params` (tensors, or param-group dicts)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        # min_8bit_size=0: every tensor gets 8-bit state, so its bytes are one exact formula.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)
    raise ValueError(f"unknown optimiser {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def param_groups(layers: Sequence[ElaLoRALinear], heads: Sequence[nn.Parameter], lr: float, cfg: ElaLoRAConfig) -> list[dict]:
    """One group per kind of tensor: A, E (lr x lr_mult_E), B (lr x lr_mult_B), heads; empty ones left out."""
    groups = [
        {"params": [l.lora_A for l in layers], "lr": lr},
        {"params": [l.lora_E for l in layers], "lr": lr * cfg.lr_mult_E},
        {"params": [l.lora_B for l in layers], "lr": lr * cfg.lr_mult_B},
        {"params": list(heads), "lr": lr},
    ]
    return [g for g in groups if g["params"]]


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
    weights_from: str | None = None,
) -> TrainState:
    """Plan initial ranks from the budget, wrap the target linears, build optimiser and schedules.

    Seeds torch's global RNG (dropout) with `seed`; seed it before loading a
    model too when the model has freshly initialised parts (a new head).
    `weights_from` (a model folder or hub id) is where the residual start reads
    the full-precision weights.
    """
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)

    shapes = target_shapes(model, paths)
    cost, fixed, rank_plan = plan_ranks(shapes, [p.numel() for p in heads], cfg)
    layers = wrap_linears(
        model, paths, rank_plan.rank, cfg.alpha, cfg.dropout, cfg.init_std, seed=seed,
        start=cfg.init, scaling=cfg.scaling, score_state=cfg.score_state,
    )
    if cfg.init == "residual":
        if weights_from is None:
            raise ValueError("the residual start needs weights_from: the model's folder or hub id")
        for path, weight in full_precision_weights(weights_from, paths, base_model_prefix(model)):
            apply_residual(layers[path], weight, seed)
    heads = list(heads)
    optimizer = build_optimizer(param_groups(list(layers.values()), heads, lr, cfg), cfg.optimizer, lr, weight_decay, foreach)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    ranks = ElasticRanks(
        layers=layers,
        shapes=shapes,
        schedule=cfg.schedule(total_steps),
        budget_bytes=cfg.budget_bytes,
        cost=cost,
        fixed_bytes=fixed,
        k=cfg.k,
        r_min=cfg.r_min,
        per_byte=cfg.allocation == "per-byte",
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        seed=seed,
    )
    return TrainState(model, layers, heads, optimizer, scheduler, ranks, rank_plan, cfg, total_steps)


def orthogonality_regulariser(layers: Sequence[ElaLoRALinear], gamma: float, form: str = "plain") -> torch.Tensor | None:
    """gamma x the mean over live layers of their orthogonality penalty (None when there is nothing to add)."""
    live = [layer for layer in layers if layer.rank > 0]
    if gamma == 0 or not live:
        return None
    return gamma * torch.stack([layer.orthogonality_penalty(form) for layer in live]).mean()


def train_step(state: TrainState, batch, loss_fn: LossFn) -> float:
    """One optimiser step; returns the task loss."""
    state.model.train()
    loss = loss_fn(state.model, batch)
    gamma = state.cfg.gamma_at(state.step, state.total_steps)
    reg = orthogonality_regulariser(list(state.layers.values()), gamma, state.cfg.regulariser)
    total = loss if reg is None else loss + reg
    total.backward()
    value = loss.item()
    if state.after_backward is not None:
        value = state.after_backward(state.trainable_params(), batch, value)
    state.optimizer.step()
    state.step += 1
    record = state.ranks.after_step(state.step, state.optimizer)
    if record is not None and state.after_round is not None:
        state.after_round(record.step, record.ranks)
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return value


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


def model_loss(model, batch) -> torch.Tensor:
    """The loss a transformers model computes itself from the batch's labels."""
    return model(**batch).loss
