"""Gradient-derived importance scores (ElaLoRA spec, section 2).

Per element w of A, E, B, after backward:
    I = |w * dL/dw|;  Ibar <- b1 Ibar + (1-b1) I;  Ubar <- b2 Ubar + (1-b2) |I - Ibar|
and the score of triplet i is s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), with
s = Ibar * Ubar. The update runs as a handful of `torch._foreach_*` calls over
all adapted layers at once, so its cost stays a small fraction of a step.

Where the EMAs live is the layer's `score_state`:
- "element": fp32 per element, the formula above;
- "element-bf16": the same, stored in bf16 (computed in fp32);
- "triplet": per triplet and tensor, the EMAs of the row (A) or column (B)
  mean of I, so s(A_i) = Ibar(mean_j I_ij) * Ubar(...) replaces mean_j s(A_ij).
  Exact for E. For A and B it is an approximation, not a reduction: Ibar of
  the mean equals the mean of Ibar (an EMA is linear), but Ubar of the mean
  is smaller than the mean of Ubar, because the elements' deviations partly
  cancel (by about sqrt(d) when they are independent). So A's and B's terms
  weigh less against E's than in the element layout, wide layers' the most.
  Two floats per triplet and tensor instead of two per element: the training
  state of an adapter is then about LoRA's at equal rank. How often a round
  decides differently is measured by bench/score_state.py (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layer import ADAPTER_TENSORS, TRIPLET_DIM, ElaLoRALinear


def _ema(ibars: list[torch.Tensor], ubars: list[torch.Tensor], current: list[torch.Tensor], beta1: float, beta2: float) -> None:
    torch._foreach_lerp_(ibars, current, 1.0 - beta1)
    deviation = torch._foreach_sub(current, ibars)
    torch._foreach_abs_(deviation)
    torch._foreach_lerp_(ubars, deviation, 1.0 - beta2)


@torch.no_grad()
def update_importance(layers: Sequence[ElaLoRALinear], beta1: float = 0.85, beta2: float = 0.85) -> None:
    """Fold the current gradients into every layer's score EMAs."""
    groups: dict[str, tuple[list, list, list, list]] = {}
    for layer in layers:
        if layer.rank == 0:
            continue
        for name in ADAPTER_TENSORS:
            param = getattr(layer, name)
            if param.grad is None:
                continue
            ibar, ubar = layer.score_buffers(name)
            params, ibars, ubars, names = groups.setdefault(layer.score_state, ([], [], [], []))
            params.append(param)
            ibars.append(ibar)
            ubars.append(ubar)
            names.append(name)
    for score_state, (params, ibars, ubars, names) in groups.items():
        current = torch._foreach_mul([p.detach() for p in params], [p.grad for p in params])
        torch._foreach_abs_(current)
        if score_state == "element":
            _ema(ibars, ubars, current, beta1, beta2)
        elif score_state == "element-bf16":
            ib, ub = [b.float() for b in ibars], [b.float() for b in ubars]
            _ema(ib, ub, current, beta1, beta2)
            torch._foreach_copy_(ibars, ib)
            torch._foreach_copy_(ubars, ub)
        else:  # per triplet: reduce over the dimension that is not the triplet's
            reduced = [c if name == "lora_E" else c.mean(dim=1 - TRIPLET_DIM[name]) for c, name in zip(current, names)]
            _ema(ibars, ubars, reduced, beta1, beta2)


@torch.no_grad()
def triplet_scores(layer: ElaLoRALinear) -> torch.Tensor:
    """One score per triplet of `layer` (shape [rank]), on the CPU in fp32."""
    if layer.rank == 0:
        return torch.zeros(0)
    per_tensor = {}
    for name in ADAPTER_TENSORS:
        ibar, ubar = layer.score_buffers(name)
        s = ibar.float() * ubar.float()
        per_tensor[name] = s.mean(dim=1 - TRIPLET_DIM[name]) if s.dim() == 2 else s
    return (per_tensor["lora_E"] + per_tensor["lora_A"] + per_tensor["lora_B"]).cpu()
