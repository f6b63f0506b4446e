"""How much of what NF4 loses does the residual start give back at step 0?

Loads SmolLM2-135M three ways (full precision; NF4; NF4 + the residual start
at several ranks, no training) and reports held-out perplexity on the Python
documentation blocks, with the share of the quantisation error's energy
(||W - deq(NF4(W))||_F^2) that the rank-r start removes.

    python bench/residual_start.py --ranks 4 8 32
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from quality import RESULTS, TASKS, Cell, _load_data  # noqa: E402


def main() -> None:
    from transformers import AutoTokenizer

    from qelalora.base import embedded
    from qelalora.base.checkpoint_reads import full_precision_weights
    from qelalora.base.models import load_base_model, target_paths, wrap_linears
    from qelalora.method.starts import apply_residual
    from qelalora.run.recipe import load_recipe
    from qelalora.run.train.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    t = TASKS["smollm2"]
    recipe = load_recipe(t["recipe"], [f"data.{k}={v}" for k, v in t["data"].items()])
    name = embedded.resolve_model(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cell = Cell("smollm2", "elalora", 4, 0, split=args.split)

    def perplexity(model, examples) -> float:
        return evaluate(model, examples, "causal-lm", t["eval_batch"], pad_id, "cpu")["perplexity"]

    full, spec = load_base_model(name, "none")
    _, held_out, pad_id = _load_data(cell, recipe, tokenizer, spec)
    out = {"split": args.split, "blocks": len(held_out), "full_precision": perplexity(full, held_out)}
    del full
    model, _ = load_base_model(name, "nf4")
    out["nf4"] = perplexity(model, held_out)
    for rank in args.ranks:
        model, _ = load_base_model(name, "nf4")
        paths = target_paths(model, spec, recipe.model.targets or list(spec.targets))
        started = time.perf_counter()
        layers = wrap_linears(model, paths, rank, alpha=16.0, start="residual")
        shares = [apply_residual(layers[path], weight) for path, weight in full_precision_weights(name, paths, "model")]
        seconds = time.perf_counter() - started
        out[f"nf4+residual r{rank}"] = {"perplexity": perplexity(model, held_out), "start_seconds": round(seconds, 1),
                                        "median_error_share_removed": statistics.median(shares)}
        del model, layers
    print(json.dumps(out, indent=1))
    with open(RESULTS / "residual_start.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
