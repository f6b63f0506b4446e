"""What a finished run reports: rank pattern and pictures (adapters: `adapter_io`).

- `rank_pattern.json`: initial and final rank per layer, and every round.
- `rank_final.png`, `rank_heatmap.png`: rank per layer at the end, and over rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import write_json_atomic
from ..method.elastic import ElasticRanks

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
    """`model.layers.3.self_attn.q_proj` -> `3.self_attn.q_proj`: block index and what follows, for plot labels."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i:])
    return path


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
