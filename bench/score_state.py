"""Compact score state: bytes saved, and how often a rank round decides differently than with fp32 EMAs.

One training run keeps the spec's fp32 per-element EMAs (the decisions it
applies) and, fed with the same gradients, shadow EMAs in each compact layout
(bf16 per element; fp32 per triplet). At every round the plan each layout
would make is compared with the applied one; the shadows are then resized as
the applied plan resized the layers, so every round compares like with like.

    python bench/score_state.py --task minilm --rank 2 --rank 8
    python bench/score_state.py --task smollm2 --rank 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from quality import RESULTS, TASKS, Cell, _load_data, elalora_config  # noqa: E402

LAYOUTS = ("element-bf16", "triplet")


class Shadow:
    """A layer's adapter tensors (shared) with score EMAs of another layout (its own)."""

    def __init__(self, layer, score_state: str):
        self.layer, self.score_state = layer, score_state
        for name in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, name)
            shape, dtype = ((layer.rank,), torch.float32) if score_state == "triplet" else (p.shape, torch.bfloat16)
            setattr(self, f"{name}_ibar", torch.zeros(shape, dtype=dtype))
            setattr(self, f"{name}_ubar", torch.zeros(shape, dtype=dtype))

    def __getattr__(self, name):  # rank, lora_A, lora_E, lora_B come from the real layer
        return getattr(self.__dict__["layer"], name)

    def score_buffers(self, name):
        return getattr(self, f"{name}_ibar"), getattr(self, f"{name}_ubar")

    def follow(self, removed: list[int], n_new: int) -> None:
        from qelalora.method.layer import score_dim

        for name in ("lora_A", "lora_E", "lora_B"):
            for kind in ("ibar", "ubar"):
                buf = getattr(self, f"{name}_{kind}")
                dim = score_dim(name, buf)
                keep = torch.tensor([t for t in range(buf.shape[dim]) if t not in set(removed)], dtype=torch.long)
                kept = buf.index_select(dim, keep)
                shape = list(kept.shape)
                shape[dim] = n_new
                setattr(self, f"{name}_{kind}", torch.cat([kept, torch.zeros(shape, dtype=buf.dtype)], dim=dim))


def _decisions(plan) -> tuple[set, set]:
    pruned = {(li, t) for li, ts in plan.prune.items() for t in ts}
    grown = {(li, n) for li, n in plan.grow.items()}
    return pruned, grown


def _jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def run(task: str, rank: int, seed: int) -> dict:
    from transformers import AutoTokenizer

    from qelalora.base import embedded
    from qelalora.base.models import head_params, load_base_model, target_paths
    from qelalora.method.allocator import LayerView, plan_round
    from qelalora.method.budget import StateCost, layer_bytes
    from qelalora.method.importance import triplet_scores, update_importance
    from qelalora.run.data.batches import BatchStream
    from qelalora.run.recipe import load_recipe
    from qelalora.run.train.step import prepare_training, train_step

    t = TASKS[task]
    cell = Cell(task, "elalora", rank, seed, variant="", split="val")
    recipe = load_recipe(t["recipe"], [f"data.{k}={v}" for k, v in t["data"].items()])
    name = embedded.resolve_model(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model, spec = load_base_model(name, "nf4", recipe.model.num_labels)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    train, _, pad_id = _load_data(cell, recipe, tokenizer, spec)
    paths = target_paths(model, spec, recipe.model.targets or list(spec.targets))
    cfg = elalora_config(cell, t)
    cfg.score_state = "element"  # the decisions applied; the layouts compared are shadows
    state = prepare_training(model, paths, head_params(model, spec), cfg, t["steps"], t["lr"], 0, seed=seed, weights_from=name)
    ranks = state.ranks
    ranks.budget_bytes = ranks.adapter_bytes()
    layers = list(state.layers.values())
    shadows = {layout: [Shadow(l, layout) for l in layers] for layout in LAYOUTS}
    compared = {layout: [] for layout in LAYOUTS}
    real_after_step, real_round = ranks.after_step, ranks.run_round

    def after_step(step, optimizer):
        if ranks.schedule.updates_scores(step):
            for group in shadows.values():
                update_importance(group, cfg.beta1, cfg.beta2)
        return real_after_step(step, optimizer)

    def run_round(step, b, optimizer):
        applied = ranks.plan(b)
        for layout, group in shadows.items():
            views = [LayerView(s, l.rank, triplet_scores(sh)) for s, l, sh in zip(ranks.shapes, layers, group)]
            plan = plan_round(views, b, ranks.k, ranks.r_min, ranks.budget_bytes, ranks.cost, ranks.fixed_bytes,
                              ranks.max_total_rank, ranks.per_byte)
            (p1, g1), (p2, g2) = _decisions(applied), _decisions(plan)
            compared[layout].append({"step": step, "identical": p1 == p2 and g1 == g2, "prune_jaccard": _jaccard(p1, p2),
                                     "grow_jaccard": _jaccard(g1, g2)})
        record = real_round(step, b, optimizer)
        for group in shadows.values():
            for li in sorted(set(applied.prune) | set(applied.grow)):
                group[li].follow(applied.prune.get(li, []), applied.grow.get(li, 0))
        return record

    ranks.after_step, ranks.run_round = after_step, run_round
    stream = BatchStream(train, t["batch"], pad_id, seed)
    started = time.time()
    for _ in range(t["steps"]):
        train_step(state, next(stream), lambda m, b: m(**b).loss)
    shapes = ranks.shapes
    bytes_at = {layout: sum(layer_bytes(s.d_in, s.d_out, rank, StateCost("adamw", layout)) for s in shapes)
                for layout in ("element", *LAYOUTS)}
    summary = {
        "task": task, "rank": rank, "seed": seed, "seconds": round(time.time() - started), "config": {"init": cfg.init},
        "adapter_state_bytes_at_start": bytes_at,
        "rounds": len(compared[LAYOUTS[0]]),
    }
    for layout, rows in compared.items():
        summary[layout] = {
            "identical_rounds": sum(r["identical"] for r in rows),
            "mean_prune_jaccard": statistics.fmean(r["prune_jaccard"] for r in rows) if rows else None,
            "mean_grow_jaccard": statistics.fmean(r["grow_jaccard"] for r in rows) if rows else None,
            "rounds": rows,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="minilm")
    parser.add_argument("--rank", type=int, action="append")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = RESULTS / "score_state.jsonl"
    for rank in args.rank or [2]:
        result = run(args.task, rank, args.seed)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        brief = {k: v for k, v in result.items() if k not in LAYOUTS}
        brief.update({layout: {k: v for k, v in result[layout].items() if k != "rounds"} for layout in LAYOUTS})
        print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
