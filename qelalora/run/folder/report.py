"""What a finished run reports: its rank pattern (initial and final rank per layer, and every round), two
pictures of it (rank per layer at the end, and over rounds), and the summary `qelalora report` prints.
Adapters are `adapter_io`'s; file names are `layout`'s."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qelalora.errors import RunDirError
from qelalora.method.elastic import ElasticRanks
from qelalora.units import fmt_mib

from .layout import RunFolder, read_json, write_json_atomic


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


def plot_ranks(history: dict, folder: RunFolder) -> list[Path]:
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
    paths.append(folder.rank_final)
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
    paths.append(folder.rank_heatmap)
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_rank_pattern(folder: RunFolder, ranks: ElasticRanks) -> dict:
    history = rank_history(ranks)
    write_json_atomic(folder.rank_pattern, history)
    return history


def summarise(folder: RunFolder) -> str:
    """`qelalora report`: the run's summary, rank and memory in a few lines; its rank pictures are redrawn."""
    folder.require((folder.report, folder.rank_pattern, folder.memory), "a finished run")
    try:
        summary, history, memory = (read_json(p) for p in (folder.report, folder.rank_pattern, folder.memory))
        pictures = plot_ranks(history, folder)
        return (
            f"run {folder.path}: {summary['steps']} steps in {summary['seconds']} s\n"
            f"  metrics: {json.dumps(summary['metrics'])}\n"
            f"  total rank {summary['total_rank']['initial']} -> {summary['total_rank']['final']} over {summary['rank_rounds']} rounds; "
            f"adapter state {fmt_mib(summary['adapter_bytes_final'], 2)} of {fmt_mib(summary['budget_bytes'], 0)}\n"
            f"  memory: predicted {fmt_mib(memory['footprint']['total_bytes'], 0)}, "
            f"measured {fmt_mib(memory['measured_training_bytes'], 0)} for training "
            f"(peak {fmt_mib(memory['measured_peak_bytes'], 0)}, {memory['measured']})\n"
            f"  pictures: {', '.join(str(p) for p in pictures)}"
        )
    except (KeyError, TypeError, ValueError) as err:
        raise RunDirError(f"{folder.path} holds malformed run metadata ({type(err).__name__}: {err})") from None
