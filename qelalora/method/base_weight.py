"""The frozen base linear as the method sees it: its shape and its dense weight (dequantised from NF4).

Used by the layer, the residual start and the exporter's merge, so that none of them imports another for it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def base_weight_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an nn.Linear or a bitsandbytes Linear4bit."""
    return base.out_features, base.in_features


def dequantized_base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense fp32 matrix (dequantised if it is NF4)."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach().float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).float()
