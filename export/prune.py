"""Export-time pruning: drop triplets too small to change the function, and dead layers.

The matrix a triplet adds to W0 is s E_i B_i A_i^T, whose spectral norm is
s |E_i| ||A_i|| ||B_i||: no output moves by more than that times ||x||. A
triplet below `threshold` (default 1e-6) is removed; a layer left with rank 0
disappears from every exported graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qelalora.method.layer import ElaLoRALinear
from qelalora.method.resizer import resize_layer

DEFAULT_THRESHOLD = 1e-6
FP32 = 4


def triplet_norms(layer: ElaLoRALinear) -> torch.Tensor:
    """Spectral norm of each triplet's rank-1 update s E_i B_i A_i^T."""
    with torch.no_grad():
        return layer.scaling * layer.lora_E.abs() * layer.lora_A.norm(dim=1) * layer.lora_B.norm(dim=0)


def adapter_weight_bytes(layers: dict[str, ElaLoRALinear]) -> int:
    """fp32 bytes of the adapter tensors as they would be shipped."""
    return sum(FP32 * l.rank * (l.in_features + l.out_features + 1) for l in layers.values())


@dataclass
class PruneReport:
    threshold: float
    ranks_before: dict[str, int]
    ranks_after: dict[str, int]
    bytes_before: int
    bytes_after: int

    @property
    def removed_layers(self) -> list[str]:
        return [n for n, r in self.ranks_after.items() if r == 0 and self.ranks_before[n] > 0]

    def to_dict(self) -> dict:
        return {**asdict(self), "total_rank_before": sum(self.ranks_before.values()),
                "total_rank_after": sum(self.ranks_after.values()), "removed_layers": self.removed_layers}


def prune_adapters(layers: dict[str, ElaLoRALinear], threshold: float = DEFAULT_THRESHOLD) -> PruneReport:
    before = {n: l.rank for n, l in layers.items()}
    bytes_before = adapter_weight_bytes(layers)
    generator = torch.Generator()
    for layer in layers.values():
        if layer.rank == 0:
            continue
        small = (triplet_norms(layer) < threshold).nonzero().flatten().tolist()
        if small:
            resize_layer(layer, small, 0, None, generator)
    return PruneReport(threshold, before, {n: l.rank for n, l in layers.items()}, bytes_before, adapter_weight_bytes(layers))
