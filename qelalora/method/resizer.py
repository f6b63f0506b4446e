"""Apply a round plan to the layers, their score buffers and the optimiser state.

The `nn.Parameter` objects stay the same (`p.data` is replaced), so the
optimiser, its param groups and the LR scheduler never notice a round.
Surviving triplets keep their values and moments exactly; a new triplet is
function-preserving (what it looks like depends on the layer's start, see
`qelalora.method.starts`), with `exp_avg = 0` and `exp_avg_sq` = the mean of the
tensor's surviving second moments, so its first steps are no larger than its
neighbours', and score EMAs at zero.
Handles torch's Adam/AdamW (plain, foreach, fused) and bitsandbytes' 8-bit
AdamW (whose blockwise state is dequantised, resized and requantised).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .allocator import RoundPlan
from .budget import BNB_BLOCK
from .layer import ADAPTER_TENSORS, TRIPLET_DIM, ElaLoRALinear, score_dim
from .starts import new_triplets

_FIRST_MOMENTS = {"exp_avg", "state1"}  # new entries start at zero; other moments at the survivors' mean
_BNB_AUX = ("qmap", "absmax")  # bitsandbytes' quantisation maps and block scales: rebuilt, never sliced


def _resize_tensor(old: torch.Tensor, keep: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    kept = old.index_select(dim, keep.to(old.device))
    return torch.cat([kept, new.to(dtype=old.dtype, device=old.device)], dim=dim)


def _new_slice_like(kept: torch.Tensor, n_new: int, dim: int, fill: float) -> torch.Tensor:
    shape = list(kept.shape)
    shape[dim] = n_new
    return torch.full(shape, fill, dtype=kept.dtype, device=kept.device)


def _resize_moment(moment: torch.Tensor, keep: torch.Tensor, n_new: int, dim: int, first_moment: bool) -> torch.Tensor:
    kept = moment.index_select(dim, keep.to(moment.device))
    fill = 0.0 if first_moment or kept.numel() == 0 else kept.float().mean().item()
    return torch.cat([kept, _new_slice_like(kept, n_new, dim, fill)], dim=dim)


def _resize_optimizer_state(state: dict, old_shape: torch.Size, keep: torch.Tensor, n_new: int, dim: int) -> None:
    moments = [
        k for k, v in state.items() if torch.is_tensor(v) and v.shape == old_shape and not k.startswith(_BNB_AUX)
    ]
    for key in moments:
        value = state[key]
        if value.dtype == torch.uint8:  # bitsandbytes 8-bit blockwise state
            import bitsandbytes.functional as bnbf

            suffix = key[-1]
            code, absmax = state[f"qmap{suffix}"], state[f"absmax{suffix}"]
            dense = bnbf.dequantize_blockwise(value, absmax=absmax, code=code, blocksize=BNB_BLOCK)
            dense = _resize_moment(dense, keep, n_new, dim, key in _FIRST_MOMENTS)
            quantized, qstate = bnbf.quantize_blockwise(dense.contiguous(), code=code, blocksize=BNB_BLOCK)
            state[key], state[f"absmax{suffix}"] = quantized, qstate.absmax
        else:
            state[key] = _resize_moment(value, keep, n_new, dim, key in _FIRST_MOMENTS)


@torch.no_grad()
def resize_layer(
    layer: ElaLoRALinear,
    remove: Sequence[int],
    n_new: int,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
) -> None:
    """Remove the triplets `remove` from `layer` and append `n_new` new ones."""
    if remove and n_new:
        raise ValueError("a layer is never pruned and grown in the same round")
    gone = set(remove)
    keep = torch.tensor([t for t in range(layer.rank) if t not in gone], dtype=torch.long)
    if n_new:
        kept_a = layer.lora_A.index_select(0, keep.to(layer.lora_A.device))
        kept_b = layer.lora_B.index_select(1, keep.to(layer.lora_B.device))
        new_a, new_e, new_b = new_triplets(layer, kept_a, kept_b, n_new, generator)
    else:
        new_a, new_e, new_b = layer.lora_A.new_zeros(0, layer.in_features), torch.zeros(0), layer.lora_B.new_zeros(layer.out_features, 0)
    new_values = {"lora_A": new_a, "lora_E": new_e, "lora_B": new_b}
    for name in ADAPTER_TENSORS:
        param = getattr(layer, name)
        dim = TRIPLET_DIM[name]
        old_shape = param.shape
        if optimizer is not None and param in optimizer.state:
            _resize_optimizer_state(optimizer.state[param], old_shape, keep, n_new, dim)
        for buf_name in (f"{name}_ibar", f"{name}_ubar"):
            buf = getattr(layer, buf_name)
            bdim = score_dim(name, buf)
            setattr(layer, buf_name, _resize_tensor(buf, keep, _new_slice_like(buf, n_new, bdim, 0.0), bdim))
        param.data = _resize_tensor(param.data, keep, new_values[name], dim)
        param.grad = None


def apply_plan(
    layers: Sequence[ElaLoRALinear],
    plan: RoundPlan,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
) -> None:
    """Resize every layer the plan names, in layer order (deterministic RNG use)."""
    for li in sorted(set(plan.prune) | set(plan.grow)):
        resize_layer(layers[li], plan.prune.get(li, []), plan.grow.get(li, 0), optimizer, generator)
