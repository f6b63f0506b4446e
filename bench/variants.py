"""Every qelalora configuration the quality bench has tried, and the suites that run them.

A variant is a set of changes to `qelalora.config.ElaLoRAConfig`'s defaults
(`preset` expands to that preset's values first). For the `lora` method the
only variant is `eqbytes`: LoRA gets the rank whose training state fills the
bytes of qelalora's default at the cell's rank. Variants are never deleted,
so that every result in bench/results/ stays explained, losers included.
"""

from __future__ import annotations

REF = {"preset": "reference"}

VARIANTS: dict[str, dict] = {
    "reference": REF,  # the paper's configuration
    "eqbytes": {},  # lora only (see above)
    # starts, regulariser off
    "g0": {**REF, "gamma": 0.0},
    "ortho": {**REF, "init": "orthonormal", "gamma": 0.0},
    "lora-start": {**REF, "init": "lora", "gamma": 0.0},
    "residual": {**REF, "init": "residual", "gamma": 0.0},
}


def _cells(task, methods, ranks, seeds, **kw):
    from quality import Cell

    return [Cell(task, m, r, s, variant=v, **kw) for s in seeds for r in ranks for (m, v) in methods]


def diagnose():
    """Update norms per layer over training (MiniLM r2, seed 0, validation split)."""
    methods = [("elalora", "reference"), ("lora", ""), ("elalora", "ortho"), ("elalora", "lora-start")]
    return _cells("minilm", methods, [2], [0], split="val", probe=10)


SUITES = {"diagnose": diagnose}
