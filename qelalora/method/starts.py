"""Where the triplets of an ElaLoRA layer start, at step 0 and when a round adds one.

- gaussian (the paper's): E = 0, A and B ~ N(0, init_std^2). Function-preserving,
  but the update s B diag(E) A grows as a product of three small factors.
- orthonormal: A's rows and B's columns orthonormal, E = 0 (the regulariser starts
  at zero). Function-preserving.
- lora: A as `nn.Linear`'s default init (uniform, +-1/sqrt(d_in)), B = 0, E = 1, so
  the update grows with one factor, as LoRA's does. Function-preserving.
- residual: A, E, B from a truncated SVD of the quantisation error W - deq(NF4(W)),
  so the adapted model starts closer to the full-precision model than the NF4
  base alone (LoftQ's idea in SVD form). Needs the full-precision weights once.

A triplet added by a rank round is function-preserving in every start: for
`lora` it is a fresh LoRA column (A row at the start's scale, orthogonal to the
kept rows; B = 0; E = 1); otherwise the spec's (unit A row and B column, each
orthogonal to the kept ones; E = 1e-13).
"""

from __future__ import annotations

import math

import torch

from .base_weight import dequantized_base_weight
from .config import STARTS

NEW_TRIPLET_E = 1e-13
LORA_ROW_NORM = 1 / math.sqrt(3)  # expected row norm of U(-1/sqrt(d), 1/sqrt(d)) in d dimensions
EXACT_SVD_MAX = 4096  # above this smaller dimension, the residual start uses a randomised SVD


def orthogonal_unit_rows(existing: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random unit rows orthogonal to the row space of `existing` and to each other."""
    d = existing.shape[1]
    if existing.shape[0] + n > d:
        raise ValueError(f"cannot add {n} orthogonal rows to {existing.shape[0]} in dimension {d}")
    basis = torch.linalg.qr(existing.detach().double().cpu().T).Q if existing.shape[0] else torch.zeros(d, 0).double()
    rows = []
    for _ in range(n):
        for _attempt in range(16):
            v = torch.randn(d, generator=generator, dtype=torch.float64)
            v /= v.norm()
            for _pass in range(2):  # project twice: one Gram-Schmidt pass loses orthogonality when ill-conditioned
                v -= basis @ (basis.T @ v)
            if v.norm() > 1e-3:
                break
        else:
            raise RuntimeError("could not find a vector orthogonal to the existing triplets")
        v /= v.norm()
        basis = torch.cat([basis, v[:, None]], dim=1)
        rows.append(v)
    return torch.stack(rows).float()


def _empty_like_on(generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `like` on the generator's device, to draw into and copy over: the seeded generator
    is a CPU one, the layer may live on CUDA, and torch refuses a CPU generator for a CUDA tensor."""
    return torch.empty(like.shape, dtype=torch.float32, device=generator.device if generator is not None else like.device)


@torch.no_grad()
def initialise(layer, start: str, generator: torch.Generator | None, init_std: float = 0.02) -> None:
    """Set a freshly built layer's A, E, B for `start` (`residual` starts orthonormal until `apply_residual`)."""
    a, e, b = layer.lora_A, layer.lora_E, layer.lora_B
    if start == "gaussian":
        a.copy_(_empty_like_on(generator, a).normal_(0.0, init_std, generator=generator))
        b.copy_(_empty_like_on(generator, b).normal_(0.0, init_std, generator=generator))
        e.zero_()
    elif start in ("orthonormal", "residual"):
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        empty_a, empty_b = a.new_zeros(0, a.shape[1]), b.new_zeros(0, b.shape[0])
        a.copy_(orthogonal_unit_rows(empty_a, a.shape[0], g))
        b.copy_(orthogonal_unit_rows(empty_b, b.shape[1], g).T)
        e.zero_()
    elif start == "lora":
        bound = 1 / math.sqrt(a.shape[1])
        a.copy_(_empty_like_on(generator, a).uniform_(-bound, bound, generator=generator))
        b.zero_()
        e.fill_(1.0)
    else:
        raise ValueError(f"unknown start {start!r}; choose one of {', '.join(STARTS)}")


def new_triplets(layer, kept_a: torch.Tensor, kept_b: torch.Tensor, n: int, generator: torch.Generator):
    """(A rows [n, d_in], E [n], B columns [d_out, n]) for n triplets appended to `layer`."""
    new_a = orthogonal_unit_rows(kept_a, n, generator)
    if layer.start == "lora":
        return new_a * LORA_ROW_NORM, torch.ones(n), torch.zeros(kept_b.shape[0], n)
    new_b = orthogonal_unit_rows(kept_b.T, n, generator).T
    return new_a, torch.full((n,), NEW_TRIPLET_E), new_b


@torch.no_grad()
def apply_residual(layer, full_weight: torch.Tensor, seed: int = 0) -> float:
    """Start `layer` at the best rank-r fit of W - deq(W0); returns the share of the error it removes.

    s B diag(E) A = U_r S_r V_r^T, so A and B are orthonormal and E holds the
    error's singular values divided by s.
    """
    rank = layer.rank
    residual = full_weight.to(torch.float32) - dequantized_base_weight(layer.base).cpu()
    if min(residual.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(residual, q=min(rank + 16, min(residual.shape)), niter=4)
        vh = v.T
    device = layer.lora_A.device
    layer.lora_A.copy_(vh[:rank].to(device))
    layer.lora_B.copy_(u[:, :rank].to(device))
    layer.lora_E.copy_((s[:rank] / layer.scaling).to(device))
    total = residual.pow(2).sum().item()
    return s[:rank].pow(2).sum().item() / total if total > 0 else 0.0
