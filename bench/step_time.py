"""Training step time: qelalora ElaLoRA vs PEFT LoRA over the same NF4 base, side by side.

For each base (a random tiny-Llama with SmolLM2's block shapes, and the
embedded MiniLM-L6 classifier) both methods train at the same rank in one
process, in interleaved blocks of steps so that machine noise hits both alike.
Reports the median step time of each, their ratio, the cost of the
importance update and of one rank round as fractions of a step.

    python bench/step_time.py [--steps 40] [--rank 8] [--out bench/out/step_time.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qelalora.base.embedded import minilm_path
from qelalora.base.models import head_params, load_base_model, target_paths
from qelalora.method.config import ElaLoRAConfig
from qelalora.method.importance import update_importance
from qelalora.run.train.step import orthogonality_regulariser, prepare_training

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def tiny_llama_dir() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    path = tempfile.mkdtemp(prefix="bench-llama-")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def batch_for(task: str, vocab: int, batch: int, seq: int, g: torch.Generator) -> dict:
    ids = torch.randint(1000 if task == "seq-cls" else 0, vocab, (batch, seq), generator=g)
    if task == "seq-cls":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] % 2).long()}
    return {"input_ids": ids, "labels": ids}


def peft_runner(path: str, rank: int, lr: float):
    from peft import LoraConfig, get_peft_model

    model, spec = load_base_model(path, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    cfg = LoraConfig(
        r=rank,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=paths,
        modules_to_save=[h.rsplit(".", 1)[0] if h.endswith(".dense") else h for h in spec.heads] or None,
    )
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def elalora_runner(path: str, rank: int, lr: float, steps: int):
    model, spec = load_base_model(path, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    # Rounds are timed on their own below: keep them out of the timed steps.
    cfg = ElaLoRAConfig(rank=rank, budget_mb=4096, t_init=10 * steps, t_final=1, delta=10)
    state = prepare_training(model, paths, head_params(model, spec), cfg, 20 * steps, lr=lr)
    layers = list(state.layers.values())
    score_times = []

    def step(batch):
        loss = model(**batch).loss
        reg = orthogonality_regulariser(layers, state.cfg.gamma, state.cfg.regulariser)
        if reg is not None:  # the shipped default may have it off
            loss = loss + reg
        loss.backward()
        state.optimizer.step()
        t0 = time.perf_counter()
        update_importance(layers)
        score_times.append(time.perf_counter() - t0)
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()

    n_params = sum(p.numel() for p in state.trainable_params())
    return step, n_params, state, score_times


def measure(name: str, path: str, task: str, vocab: int, batch: int, seq: int, steps: int, rank: int) -> dict:
    lr = 5e-4
    peft_step, peft_params = peft_runner(path, rank, lr)
    ela_step, ela_params, state, score_times = elalora_runner(path, rank, lr, steps)
    g = torch.Generator().manual_seed(0)
    times = {"elalora": [], "peft_lora": []}
    block = 5
    warmup = 3
    for i in range(warmup + steps):
        for method, fn in (("elalora", ela_step), ("peft_lora", peft_step)) if (i // block) % 2 == 0 else (
            ("peft_lora", peft_step),
            ("elalora", ela_step),
        ):
            b = batch_for(task, vocab, batch, seq, g)
            t0 = time.perf_counter()
            fn(b)
            if i >= warmup:
                times[method].append(time.perf_counter() - t0)
    round_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        state.ranks.run_round(state.step, 4, state.optimizer)
        round_times.append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "model": name,
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "steps_timed": steps,
        "trainable_params": {"elalora": ela_params, "peft_lora": peft_params},
        "median_step_s": med,
        "ratio_elalora_to_peft": med["elalora"] / med["peft_lora"],
        "importance_update_fraction_of_step": statistics.median(score_times[warmup:]) / med["elalora"],
        "rank_round_s": statistics.median(round_times),
        "rank_round_fraction_of_step": statistics.median(round_times) / med["elalora"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="bench/out/step_time.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = [
        measure("tiny-llama (SmolLM2 block shapes, 4 layers)", tiny_llama_dir(), "causal-lm", 4096, 4, 128, args.steps, args.rank),
        measure("MiniLM-L6 seq-cls", str(minilm_path()), "seq-cls", 30522, 16, 48, args.steps, args.rank),
    ]
    report = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in results:
        print(
            f"{r['model']}: ElaLoRA {r['median_step_s']['elalora'] * 1e3:.1f} ms, PEFT LoRA "
            f"{r['median_step_s']['peft_lora'] * 1e3:.1f} ms, ratio {r['ratio_elalora_to_peft']:.3f}; "
            f"importance update {100 * r['importance_update_fraction_of_step']:.1f}% of a step; "
            f"rank round {r['rank_round_s'] * 1e3:.1f} ms = {100 * r['rank_round_fraction_of_step']:.1f}% of a step"
        )


if __name__ == "__main__":
    main()
