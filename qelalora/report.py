"""What a finished run leaves behind: adapters, rank pattern, PEFT copy, pictures.

- `adapter/`: `adapter.safetensors` (A, E, B per live layer; head tensors) and
  `adapter_config.json` (base model, alpha, r0 and rank per layer).
- `peft/`: the same adapter in PEFT's LoRA format (`s B diag(E)` folded into
  `lora_B`, per-layer ranks in `rank_pattern`, `alpha_pattern` = rank so that
  PEFT's scaling is 1), loadable by PEFT and by ONNX Runtime GenAI's builder.
- `rank_pattern.json`: initial and final rank per layer, and every round.
- `rank_final.png`, `rank_heatmap.png`: rank per layer at the end, and over rounds.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import write_json_atomic
from .elastic import ElasticRanks
from .layer import ElaLoRALinear

ADAPTER_FORMAT = "qelalora-elalora-1"


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_adapter(
    out: Path,
    layers: dict[str, ElaLoRALinear],
    heads: dict[str, torch.Tensor],
    base_model: str,
    quantize: str,
    task: str,
    num_labels: int | None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layer_meta = {}
    for name, layer in layers.items():
        layer_meta[name] = {"rank": layer.rank, "r0": layer.r0, "scaling": layer.scaling, "d_in": layer.in_features, "d_out": layer.out_features}
        if layer.rank == 0:
            continue
        for t in ("lora_A", "lora_E", "lora_B"):
            tensors[f"{name}.{t}"] = getattr(layer, t)
    for name, value in heads.items():
        tensors[f"head/{name}"] = value
    save_safetensors_atomic(tensors, out / "adapter.safetensors", {"format": ADAPTER_FORMAT})
    write_json_atomic(
        out / "adapter_config.json",
        {
            "format": ADAPTER_FORMAT,
            "base_model": base_model,
            "quantize": quantize,
            "task": task,
            "num_labels": num_labels,
            "alpha": next(iter(layers.values())).alpha if layers else None,
            "layers": layer_meta,
            "heads": sorted(heads),
        },
    )


def save_peft_lora(
    out: Path, layers: dict[str, ElaLoRALinear], heads: dict[str, torch.Tensor], base_model: str, task: str, head_modules
) -> None:
    """PEFT LoRA copy: lora_A = A, lora_B = s B diag(E), scaling 1 per layer."""
    out.mkdir(parents=True, exist_ok=True)
    live = {name: layer for name, layer in layers.items() if layer.rank > 0}
    tensors = {}
    for name, layer in live.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.lora_B * (layer.lora_E * layer.scaling)).detach()
    for name, value in heads.items():
        tensors[f"base_model.model.{name}"] = value
    ranks = {name: layer.rank for name, layer in live.items()}
    r = max(ranks.values(), default=1)
    save_safetensors_atomic(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    write_json_atomic(
        out / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}[task],
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": r,
            "rank_pattern": ranks,
            "alpha_pattern": ranks,
            "target_modules": sorted(live),
            "modules_to_save": list(head_modules) or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
        },
    )


def rank_history(ranks: ElasticRanks) -> dict:
    return {
        "initial": ranks.initial_ranks,
        "final": ranks.rank_pattern(),
        "total_rank": {"initial": sum(ranks.initial_ranks.values()), "final": ranks.total_rank},
        "budget_bytes": ranks.budget_bytes,
        "rounds": [
            {
                "step": r.step,
                "b": r.b,
                "pruned": r.pruned,
                "grown": r.grown,
                "adapter_bytes": r.adapter_bytes,
                "ranks": r.ranks,
            }
            for r in ranks.history
        ],
    }


def short_layer_name(path: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `3.q_proj` (block index and leaf), for plot labels."""
    parts = path.split(".")
    digits = [p for p in parts if p.isdigit()]
    leaf = parts[-1] if parts[-1] not in ("dense",) else ".".join(parts[-2:])
    return f"{digits[0]}.{leaf}" if digits else path


def plot_ranks(history: dict, out_dir: Path) -> list[Path]:
    """Bar chart of final ranks per layer and a heatmap of rank per layer over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(history["final"])
    labels = [short_layer_name(n) for n in names]
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 3.6))
    ax.bar(range(len(names)), [history["final"][n] for n in names], color="#3b6ea8", label="final")
    ax.plot(range(len(names)), [history["initial"][n] for n in names], "k_", markersize=8, label="initial")
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_title(f"Final rank per layer (total {history['total_rank']['final']}, initial {history['total_rank']['initial']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "rank_final.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    rounds = history["rounds"]
    grid = [[history["initial"][n] for n in names]] + [[r["ranks"][n] for n in names] for r in rounds]
    steps = [0] + [r["step"] for r in rounds]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 4))
    image = ax.imshow(torch.tensor(grid, dtype=torch.float32).T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), labels, fontsize=6)
    tick_idx = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(tick_idx, [str(steps[i]) for i in tick_idx], fontsize=7)
    ax.set_xlabel("step of rank round")
    ax.set_title("Rank per layer over training")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    paths.append(out_dir / "rank_heatmap.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_rank_pattern(run_dir: Path, ranks: ElasticRanks) -> dict:
    history = rank_history(ranks)
    write_json_atomic(run_dir / "rank_pattern.json", history)
    return history


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
