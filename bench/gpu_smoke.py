"""GPU smoke test: NF4 training on CUDA at a real model size, planned vs measured memory, step time vs PEFT QLoRA.

Builds a randomly initialised Llama of a real shape (default: Llama-3.2-1B's
config; weights are random because checkpoints are too big to carry), saves
it in bf16, then on one GPU:
1. qelalora: the NF4 base in bf16 compute, ElaLoRA adapters at rank 8 on all
   seven projections, the shipped defaults, rank rounds every 10 steps; the
   memory plan's prediction against `torch.cuda.max_memory_allocated`;
2. PEFT LoRA (QLoRA) at the same rank on the same NF4 base;
and times both in interleaved blocks (medians). Writes one JSON file.

    pip install bitsandbytes-*.whl          # the device image has no bitsandbytes
    python bench/gpu_smoke.py --out $OUT/gpu_smoke.json
    python bench/gpu_smoke.py --tiny --device cpu --steps 4    # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def save_random_llama(shape: dict) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="gpu-smoke-llama-")
    LlamaForCausalLM(LlamaConfig(**shape, torch_dtype="bfloat16")).to(torch.bfloat16).save_pretrained(path)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def qelalora_runner(path: str, device: str, rank: int, batch: int, seq: int, steps: int, checkpointing: bool):
    from qelalora.base.models import head_params, load_base_model, target_paths
    from qelalora.run.plan.memory_plan import memory_plan
    from qelalora.run.recipe import load_recipe
    from qelalora.run.train.step import prepare_training, train_step

    overrides = [f"model.name={path}", "model.targets=all-linear", f"train.device={device}", f"train.batch_size={batch}",
                 f"data.max_length={seq}", f"elalora.rank={rank}", "elalora.budget_mb=4096", "elalora.max_init_rank=64",
                 f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    recipe = load_recipe("smollm2-135m-python-docs", overrides)
    plan = memory_plan(recipe)
    model, spec = load_base_model(path, "nf4", device=device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    paths = target_paths(model, spec, "all-linear")
    cfg = recipe.elalora
    cfg.t_init, cfg.t_final, cfg.delta = 2, 2, 4  # rounds inside the timed steps, as in real training
    state = prepare_training(model, paths, head_params(model, spec), cfg, steps + 10, lr=5e-4)
    return (lambda b: train_step(state, b, lambda m, x: m(**x).loss)), state, plan


def peft_runner(path: str, device: str, rank: int, checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 1B shape (dry run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu_smoke.json"))
    args = parser.parse_args()
    shape = TINY if args.tiny else LLAMA_1B
    seq = min(args.seq, shape["max_position_embeddings"])
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    path = save_random_llama(shape)
    print(f"random Llama ({'tiny' if args.tiny else '1B shape'}) saved in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "shape": shape, "batch": args.batch, "seq": seq, "rank": args.rank,
              "gradient_checkpointing": args.checkpointing}

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    ela_step, state, plan = qelalora_runner(path, args.device, args.rank, args.batch, seq, args.steps, args.checkpointing)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape["vocab_size"], (args.batch, seq), generator=g) for _ in range(4)]
    feed = lambda i: {"input_ids": batches[i % 4].to(args.device), "labels": batches[i % 4].to(args.device)}  # noqa: E731
    for i in range(3):  # warm-up, then the peak of steady training
        ela_step(feed(i))
    sync(args.device)
    if cuda:
        result["qelalora_max_allocated_bytes"] = torch.cuda.max_memory_allocated() - before
    fp = plan.footprint  # training steps only (this script runs no evaluation pass)
    result["qelalora_planned_bytes"] = fp.base_bytes + fp.adapter_bytes + fp.activation_bytes
    result["qelalora_plan"] = plan.to_dict()
    peft_step, peft_params = peft_runner(path, args.device, args.rank, args.checkpointing)
    for i in range(3):
        peft_step(feed(i))
    times = {"qelalora": [], "peft_qlora": []}
    block = 5
    for i in range(args.steps):
        order = (("qelalora", ela_step), ("peft_qlora", peft_step))
        for name, fn in order if (i // block) % 2 == 0 else order[::-1]:
            sync(args.device)
            t = time.perf_counter()
            fn(feed(i))
            sync(args.device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result.update(
        median_step_s=med, ratio_qelalora_to_peft=med["qelalora"] / med["peft_qlora"],
        trainable_params={"qelalora": sum(p.numel() for p in state.trainable_params()), "peft_qlora": peft_params},
        rank_rounds=len(state.ranks.history), total_rank=state.ranks.total_rank,
        adapter_bytes=state.ranks.adapter_bytes(), budget_bytes=state.ranks.budget_bytes,
    )
    if cuda:
        result["planned_over_measured"] = result["qelalora_planned_bytes"] / result["qelalora_max_allocated_bytes"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    json.dump({k: v for k, v in result.items() if k not in ("qelalora_plan", "shape")}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
