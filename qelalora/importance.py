"""Gradient-derived importance scores (ElaLoRA spec, section 2).

Per element w of A, E, B, after backward:
    I = |w * dL/dw|;  Ibar <- b1 Ibar + (1-b1) I;  Ubar <- b2 Ubar + (1-b2) |I - Ibar|
and the score of triplet i is s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), with
s = Ibar * Ubar. The update runs as a handful of `torch._foreach_*` calls over
all adapted layers at once, so its cost stays a small fraction of a step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layer import ADAPTER_TENSORS, ElaLoRALinear


@torch.no_grad()
def update_importance(layers: Sequence[ElaLoRALinear], beta1: float = 0.85, beta2: float = 0.85) -> None:
    """Fold the current gradients into every layer's score EMAs."""
    params, ibars, ubars = [], [], []
    for layer in layers:
        if layer.rank == 0:
            continue
        for name in ADAPTER_TENSORS:
            param = getattr(layer, name)
            if param.grad is None:
                continue
            ibar, ubar = layer.score_buffers(name)
            params.append(param)
            ibars.append(ibar)
            ubars.append(ubar)
    if not params:
        return
    grads = [p.grad for p in params]
    current = torch._foreach_mul([p.detach() for p in params], grads)
    torch._foreach_abs_(current)
    torch._foreach_lerp_(ibars, current, 1.0 - beta1)
    deviation = torch._foreach_sub(current, ibars)
    torch._foreach_abs_(deviation)
    torch._foreach_lerp_(ubars, deviation, 1.0 - beta2)


@torch.no_grad()
def triplet_scores(layer: ElaLoRALinear) -> torch.Tensor:
    """One score per triplet of `layer` (shape [rank]), on the CPU in fp32."""
    if layer.rank == 0:
        return torch.zeros(0)
    s_a = torch.mul(*layer.score_buffers("lora_A")).mean(dim=1)
    s_e = torch.mul(*layer.score_buffers("lora_E"))
    s_b = torch.mul(*layer.score_buffers("lora_B")).mean(dim=0)
    return (s_e + s_a + s_b).float().cpu()
