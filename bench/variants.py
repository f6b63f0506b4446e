"""Every qelalora configuration the quality bench has tried, and the suites that run them.

A variant is a set of changes to `qelalora.method.config.ElaLoRAConfig`'s defaults
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
    # stage 1 of the sweep: learning-rate multipliers, regulariser forms, scaling
    "ortho-e16": {**REF, "init": "orthonormal", "gamma": 0.0, "lr_mult_E": 16.0},
    "ortho-e64": {**REF, "init": "orthonormal", "gamma": 0.0, "lr_mult_E": 64.0},
    "ortho-e16-sq": {**REF, "init": "orthonormal", "gamma": 0.1, "regulariser": "squared", "lr_mult_E": 16.0},
    "lora-start-b4": {**REF, "init": "lora", "gamma": 0.0, "lr_mult_B": 4.0},
    "lora-start-b16": {**REF, "init": "lora", "gamma": 0.0, "lr_mult_B": 16.0},
    "lora-start-e16": {**REF, "init": "lora", "gamma": 0.0, "lr_mult_E": 16.0},
    "lora-start-sqrt": {**REF, "init": "lora", "gamma": 0.0, "scaling": "sqrt-rank"},
    "lora-start-rn": {**REF, "init": "lora", "gamma": 0.1, "regulariser": "rank-normalised", "gamma_decay": "linear"},
    "residual-e16": {**REF, "init": "residual", "gamma": 0.0, "lr_mult_E": 16.0},
    # stage 2: the LoRA-style start with the decaying rank-normalised regulariser, around its neighbours
    "lora-start-rn-b2": {**REF, "init": "lora", "gamma": 0.1, "regulariser": "rank-normalised", "gamma_decay": "linear",
                         "lr_mult_B": 2.0},
    "lora-start-rn-slow": {**REF, "init": "lora", "gamma": 0.1, "regulariser": "rank-normalised", "gamma_decay": "linear",
                           "delta": 25, "b0": 2},
    "lora-start-rn-triplet": {**REF, "init": "lora", "gamma": 0.1, "regulariser": "rank-normalised",
                              "gamma_decay": "linear", "score_state": "triplet"},
    # tighter budgets: the shipped defaults, but a layer may be pruned to rank 0 (leave the model)
    "floor0": {"r_min": 0},
    # rounds rank triplets by score per byte of training state (wide layers' triplets must be worth more)
    "per-byte": {"allocation": "per-byte"},
}


def _cells(task, methods, ranks, seeds, **kw):
    from quality import Cell

    return [Cell(task, m, r, s, variant=v, **kw) for s in seeds for r in ranks for (m, v) in methods]


def diagnose():
    """Update norms per layer over training (MiniLM r2, seed 0, validation split)."""
    methods = [("elalora", "reference"), ("lora", ""), ("elalora", "ortho"), ("elalora", "lora-start")]
    return _cells("minilm", methods, [2], [0], split="val", probe=10)


def sweep1():
    """Stage 1: one seed, both ranks, validation split; PEFT LoRA at three learning rates beside it."""
    variants = ["reference", "g0", "ortho", "ortho-e16", "ortho-e64", "ortho-e16-sq", "lora-start", "lora-start-b4",
                "lora-start-b16", "lora-start-e16", "lora-start-sqrt", "lora-start-rn", "residual", "residual-e16"]
    cells = _cells("minilm", [("lora", "")] + [("elalora", v) for v in variants], [2, 8], [0], split="val")
    return cells + [c for lr in (2e-3, 4e-3) for c in _cells("minilm", [("lora", "")], [2, 8], [0], split="val", lr=lr)]


def sweep2():
    """Stage 2: three seeds for the leaders of stage 1 and their neighbours, with rank rounds off beside them."""
    cells = _cells("minilm", [("lora", ""), ("elalora", "lora-start-rn")], [2, 8], [1, 2], split="val")
    cells += _cells("minilm", [("fixed", "lora-start-rn"), ("elalora", "lora-start-rn-b2"), ("elalora", "lora-start-rn-slow")],
                    [2, 8], [0, 1, 2], split="val")
    return cells + _cells("minilm", [("elalora", "lora-start-rn-triplet")], [2, 8], [0, 1, 2], split="val")


def sweep_smollm2():
    """The causal LM on its validation blocks (80 steps, one seed): the MiniLM leaders and the residual start."""
    variants = ["reference", "lora-start-rn", "lora-start-rn-triplet", "lora-start", "residual-e16"]
    return _cells("smollm2", [("lora", "")] + [("elalora", v) for v in variants], [4], [0], split="val")


def confirm():
    """The shipped defaults (variant "") on the test split, beside PEFT LoRA at equal bytes, the fixed-rank
    and the paper's configurations."""
    minilm = [("elalora", ""), ("lora", "eqbytes"), ("fixed", ""), ("elalora", "reference")]
    cells = _cells("minilm", minilm, [2, 8], [0, 1]) + _cells("minilm", minilm[:3], [2, 8], [2])
    cells += _cells("smollm2", minilm[:2], [4], [0, 1]) + _cells("smollm2", minilm[2:], [4], [0, 1])
    return cells + _cells("minilm", minilm[3:], [2, 8], [2])  # the paper's configuration: a third seed last


def confirm_long():
    """The defaults against PEFT LoRA at a longer horizon (about 3 epochs on MiniLM, like the paper's)."""
    pair = [("elalora", ""), ("lora", "eqbytes")]
    cells = _cells("minilm", pair, [2, 8], [0, 1], steps=2000) + _cells("smollm2", pair, [4], [0, 1], steps=300)
    cells += _cells("smollm2", [("fixed", "")], [4], [0, 1], steps=300)  # is SmolLM2's lead the rounds' or the start's?
    return cells + _cells("minilm", [("fixed", "")], [2], [0, 1], steps=2000)  # is the r = 2 loss the rounds' or the start's?


def sweep_lr():
    """The base learning rate for the shipped defaults (only the E/B multipliers were swept before), validation
    split, seed 0; PEFT LoRA's own sweep (1e-3, 2e-3, 4e-3) is in sweep1, its 5e-4 cell beside these."""
    cells = [c for lr in (5e-4, 1.5e-3, 2e-3) for c in _cells("minilm", [("elalora", "")], [2, 8], [0], split="val", lr=lr)]
    return cells + _cells("minilm", [("lora", "")], [2, 8], [0], split="val", lr=5e-4)


def tight():
    """Where adaptivity can pay: rank 1 everywhere at the start, so a rank round can only move rank by taking a
    layer out (r_min 0); beside it the same start with rounds off and PEFT LoRA r = 1 (validation split)."""
    methods = [("lora", "eqbytes"), ("fixed", ""), ("elalora", "floor0")]
    return _cells("minilm", methods, [1], [0, 1, 2], split="val")


def perbyte():
    """Score-per-byte rank rounds against the shipped defaults (score order), 3 seeds, validation split; PEFT LoRA's
    validation cells (seeds 0-2) are the sweep's."""
    methods = [("lora", ""), ("elalora", ""), ("elalora", "per-byte")]
    return _cells("minilm", methods, [2, 8], [0, 1, 2], split="val")


def perbyte_long():
    """Score-per-byte rounds at the longer horizon where the score order lost rank and accuracy (MiniLM r = 2,
    2,000 steps, test split, seeds 0-1); the defaults' and PEFT LoRA's cells are confirm_long's, copied in."""
    methods = [("lora", "eqbytes"), ("elalora", ""), ("elalora", "per-byte")]
    return _cells("minilm", methods, [2], [0, 1], steps=2000)


def rank_smollm2():
    """Does the causal LM's perplexity depend on rank? PEFT LoRA at r = 1 and 16 beside the sweep's r = 4
    (80 steps, validation blocks, seed 0)."""
    return _cells("smollm2", [("lora", "")], [1, 16], [0], split="val")


def sweep_lr_smollm2():
    """The causal LM's base learning rate for both methods (80 steps, validation blocks, seed 0); the 5e-4 cells
    are the sweep's."""
    return [c for lr in (1e-3, 2e-3) for c in _cells("smollm2", [("lora", ""), ("elalora", "")], [4], [0], split="val", lr=lr)]


def sweep():
    return sweep1() + sweep2() + sweep_smollm2()


SUITES = {"diagnose": diagnose, "sweep1": sweep1, "sweep2": sweep2, "sweep": sweep, "sweep_lr": sweep_lr, "confirm": confirm, "confirm_long": confirm_long,
          "tight": tight, "perbyte": perbyte, "perbyte_long": perbyte_long, "rank_smollm2": rank_smollm2,
          "sweep_lr_smollm2": sweep_lr_smollm2}
