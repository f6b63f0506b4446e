"""A training process for tests/test_distributed.py: trains with the library's loop and saves what it ended with."""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from qelalora.errors import UserError
from qelalora.run.recipe import load_recipe
from qelalora.run.train import distributed
from qelalora.run.train.build import build_run
from qelalora.run.train.step import model_loss, train_step


def train(rank: int, world: int, port: int, recipe_path: str, out: str, steps: int, perturb: bool = False) -> None:
    """Process `rank` of `world` (world 1: no process group) trains `steps` steps; writes out/process-<rank>.*"""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    procs = distributed.from_environment()
    device = distributed.start(procs, "cpu")
    result: dict = {"rank": rank}
    try:
        run = build_run(load_recipe(recipe_path), log=lambda *a, **k: None, procs=procs, device=device)
        if perturb and procs.rank == 1:  # this process alone prunes one triplet more in every round
            honest = run.state.ranks.plan
            run.state.ranks.plan = lambda b: honest(b + 1)
        losses = [train_step(run.state, next(run.stream), model_loss) for _ in range(steps)]
        tensors = {f"{name}.{t}": getattr(layer, t).detach().clone().contiguous()
                   for name, layer in run.state.layers.items() for t in ("lora_A", "lora_E", "lora_B")}
        tensors.update({f"head.{i}": p.detach().clone() for i, p in enumerate(run.state.head_params)})
        save_file(tensors, str(Path(out) / f"process-{rank}.safetensors"))
        result.update(losses=losses, ranks=run.state.ranks.rank_pattern(), rounds=len(run.state.ranks.history))
    except UserError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        (Path(out) / f"process-{rank}.json").write_text(json.dumps(result))
        distributed.finish()
