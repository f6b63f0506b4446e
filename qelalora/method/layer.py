"""The ElaLoRA layer: a frozen (NF4 or plain) linear plus a variable-rank branch.

    h = W0 x + b + s * B diag(E) A x,    s = alpha / r0  (or alpha / sqrt(r0))

The rank r is the number of triplets (row A[i], E[i], column B[:, i]). It
changes only through `qelalora.method.resizer`, which replaces the tensors behind the
same `nn.Parameter` objects, so optimisers keep tracking them. The layer also
holds the importance-score EMAs of its adapter tensors (per element, or per
triplet: see `StateCost`), so that they move with the module and are resized
with it. Where the triplets start is `qelalora.method.starts`' job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import starts
from .base_weight import base_weight_shape
from .config import REGULARISER_FORMS, SCALINGS

ADAPTER_TENSORS = ("lora_A", "lora_E", "lora_B")
# Dimension along which each adapter tensor holds its triplets.
TRIPLET_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}


def scaling_for(alpha: float, r0: int, rule: str = "rank") -> float:
    """s = alpha / r0 (the paper's, and LoRA's) or alpha / sqrt(r0) (rsLoRA's)."""
    if rule == "rank":
        return alpha / r0
    if rule == "sqrt-rank":
        return alpha / math.sqrt(r0)
    raise ValueError(f"unknown scaling {rule!r}; choose one of {', '.join(SCALINGS)}")


def score_dim(name: str, buffer: torch.Tensor) -> int:
    """Dimension along which a score buffer holds its triplets (per-triplet buffers are 1-D)."""
    return 0 if buffer.dim() == 1 else TRIPLET_DIM[name]


class ElaLoRALinear(nn.Module):
    """A frozen base linear with an ElaLoRA branch of rank `rank`."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        start: str = "gaussian",
        scaling: str = "rank",
        score_state: str = "element",
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"initial rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_out, d_in = base_weight_shape(base)
        self.in_features, self.out_features = d_in, d_out
        self.r0 = rank
        self.alpha = float(alpha)
        self.scaling = scaling_for(self.alpha, rank, scaling)  # fixed for the layer's lifetime
        self.score_state = score_state
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in, device=device))
        self.lora_E = nn.Parameter(torch.zeros(rank, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=device))
        self.start = start  # decides what a triplet added later looks like (see `starts.new_triplets`)
        starts.initialise(self, start, generator, init_std)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_scores()

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    def adapter_params(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_E, self.lora_B]

    def reset_scores(self) -> None:
        """Zeroed score EMAs of the right size for the current rank and score layout."""
        for name in ADAPTER_TENSORS:
            param = getattr(self, name)
            if self.score_state == "triplet":
                empty = torch.zeros(self.rank, device=param.device)
            elif self.score_state == "element-bf16":
                empty = torch.zeros_like(param, dtype=torch.bfloat16)
            elif self.score_state == "element":
                empty = torch.zeros_like(param, dtype=torch.float32)
            else:
                raise ValueError(f"unknown score_state {self.score_state!r}")
            self.register_buffer(f"{name}_ibar", empty, persistent=False)
            self.register_buffer(f"{name}_ubar", empty.clone(), persistent=False)

    def score_buffers(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_ibar"), getattr(self, f"{name}_ubar")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.rank == 0:
            return out
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        h = F.linear(h * (self.lora_E * self.scaling), self.lora_B)
        return out + h.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(E) A, the dense update this branch adds to W0."""
        return (self.lora_B * (self.lora_E * self.scaling)) @ self.lora_A

    def orthogonality_penalty(self, form: str = "plain") -> torch.Tensor:
        """How far A's rows and B's columns are from orthonormal (zero for a rank-0 layer).

        plain: ||A A^T - I||_F + ||B^T B - I||_F (the paper's); squared: the sum of
        squares, whose gradient fades near the minimum; rank-normalised: squared / r.
        """
        if self.rank == 0:
            return self.lora_A.new_zeros(())
        eye = torch.eye(self.rank, device=self.lora_A.device, dtype=self.lora_A.dtype)
        a = self.lora_A @ self.lora_A.T - eye
        b = self.lora_B.T @ self.lora_B - eye
        if form == "plain":
            return torch.linalg.matrix_norm(a) + torch.linalg.matrix_norm(b)
        squared = a.pow(2).sum() + b.pow(2).sum()
        if form == "squared":
            return squared
        if form == "rank-normalised":
            return squared / self.rank
        raise ValueError(f"unknown regulariser form {form!r}; choose one of {', '.join(REGULARISER_FORMS)}")

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, r0={self.r0}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, start={self.start}"
        )


def measure_adapter_bytes(
    layers: Sequence[ElaLoRALinear], extra_params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer | None
) -> int:
    """Adapter-state bytes read off the real tensors.

    Counts each trainable tensor's value, its gradient as the same size (it
    exists at the step's peak, whether or not it is allocated right now), every
    tensor in its optimiser state (shared ones once), and the score EMAs.
    """
    seen: set[int] = set()
    total = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    params = [p for layer in layers for p in layer.adapter_params()] + list(extra_params)
    for p in params:
        total += 2 * p.numel() * p.element_size()
        if optimizer is not None:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    count(value)
    for layer in layers:
        for name in ADAPTER_TENSORS:
            for buf in layer.score_buffers(name):
                total += buf.numel() * buf.element_size()
    return total
