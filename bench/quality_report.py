"""Tables and pictures from `bench/quality.py`'s results: every run is shown, none dropped.

    python bench/quality.py --report     # writes quality.md and quality_*.png next to the results
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("elalora", "fixed", "lora", "adalora", "elalora-reset-moments", "elalora-const-lr", "elalora-rank-budget",
                "elalora-g0", "fixed-g0", "adalora-g0")
ABLATIONS = METHOD_ORDER[4:7]
NO_REGULARISER = METHOD_ORDER[7:]
HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False}
LAYER_TYPE = {  # module path without its block index -> short name
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "ffn-in",
    "output.dense": "ffn-out",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}


def layer_type(name: str) -> tuple[str, int]:
    """('q', 3) for '...layer.3.attention.self.query'."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return LAYER_TYPE.get(match.group(2), match.group(2)), int(match.group(1))


def fmt(values: list[float], metric: str) -> str:
    scale, digits = (100, 2) if metric == "accuracy" else (1, 3)
    xs = [v * scale for v in values]
    spread = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
    return f"{statistics.fmean(xs):.{digits}f}{spread}"


def cells(results: list[dict]) -> dict[tuple, dict[int, dict]]:
    """(task, rank, method) -> seed -> record, first runs only (repeats are for the reproducibility check)."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in results:
        if "error" not in r and r["repeat"] == 0:
            out[(r["task"], r["rank"], r["method"])][r["seed"]] = r
    return dict(out)


def paired_delta(a: dict[int, dict], b: dict[int, dict], metric: str) -> str:
    """Mean of a - b over shared seeds, its spread, and mean/standard-error (|t| > ~4.3 is p < 0.05 at n = 3)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "-"
    scale = 100 if metric == "accuracy" else 1
    d = [(a[s]["metric"] - b[s]["metric"]) * scale for s in seeds]
    if len(d) == 1:
        return f"{d[0]:+.2f} (1 seed)"
    sd = statistics.stdev(d)
    if sd == 0:
        return f"{statistics.fmean(d):+.2f} on every seed"
    t = statistics.fmean(d) / (sd / math.sqrt(len(d)))
    return f"{statistics.fmean(d):+.2f} ± {sd:.2f} (t = {t:+.1f})"


def quality_table(grid, tasks_ranks, methods, baseline: str) -> list[str]:
    lines = []
    for task, rank in tasks_ranks:
        metric = next(r["metric_name"] for (t, _, _), runs in grid.items() if t == task for r in runs.values())
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        unit = "test accuracy, %" if metric == "accuracy" else "held-out perplexity"
        lines += [f"**{task}, average rank {rank}** ({unit}, {better} is better; mean ± sd over seeds)", ""]
        lines += [f"| method | seeds | mean ± sd | every run (seed: value) | paired Δ vs {baseline} (mean ± sd, t) | exported adapter params | final total rank |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for m in methods:
            runs = grid.get((task, rank, m))
            if not runs:
                continue
            scale = 100 if metric == "accuracy" else 1
            each = ", ".join(f"{s}: {runs[s]['metric'] * scale:.2f}" for s in sorted(runs))
            params = statistics.fmean(r["exported_params"] for r in runs.values())
            total_rank = statistics.fmean(sum(r["ranks"].values()) for r in runs.values())
            delta = "-" if m == baseline else paired_delta(runs, grid.get((task, rank, baseline), {}), metric)
            lines.append(f"| {m} | {len(runs)} | {fmt([r['metric'] for r in runs.values()], metric)} | {each} | {delta} | {params:,.0f} | {total_rank:.0f} |")
        lines.append("")
    return lines


def cost_table(grid, tasks_ranks) -> list[str]:
    lines = ["| task, rank | method | median step (s) | step / LoRA | peak training RSS (MiB) | RSS / LoRA | adapter state (MiB) | time in rank rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, rank in tasks_ranks:
        lora = grid.get((task, rank, "lora"), {})
        for m in METHOD_ORDER[:7]:  # the -g0 runs shared the machine with the test suite: no timings from them
            runs = grid.get((task, rank, m))
            if not runs:
                continue
            step = statistics.median(r["median_step_s"] for r in runs.values())
            rss = statistics.median(r["peak_train_rss_bytes"] for r in runs.values()) / 2**20
            paired = [s for s in runs if s in lora]
            step_ratio = statistics.median(runs[s]["median_step_s"] / lora[s]["median_step_s"] for s in paired) if paired else math.nan
            rss_ratio = statistics.median(runs[s]["peak_train_rss_bytes"] / lora[s]["peak_train_rss_bytes"] for s in paired) if paired else math.nan
            state = statistics.median(r["state_bytes"] for r in runs.values()) / 2**20
            rounds = statistics.median(r["round_seconds"] for r in runs.values())
            share = statistics.median(r["round_seconds"] / r["train_seconds"] for r in runs.values())
            lines.append(f"| {task}, r{rank} | {m} | {step:.3f} | {step_ratio:.2f} | {rss:,.0f} | {rss_ratio:.2f} | {state:.2f} | {rounds:.2f} s ({100 * share:.2f}%) |")
    return lines


def rank_by_type(runs: dict[int, dict]) -> dict[str, float]:
    per_type = defaultdict(list)
    for r in runs.values():
        for name, rank in r["ranks"].items():
            per_type[layer_type(name)[0]].append(rank)
    return {t: statistics.fmean(v) for t, v in per_type.items()}


def rank_tables(grid, tasks_ranks) -> list[str]:
    lines = []
    for task, rank in tasks_ranks:
        for m in ("elalora", "elalora-g0", "adalora"):
            runs = grid.get((task, rank, m))
            if runs:
                means = rank_by_type(runs)
                lines.append(f"| {task}, r{rank} | {m} | " + ", ".join(f"{t} {v:.2f}" for t, v in means.items()) + " |")
    return ["| task, start rank | method | mean final rank per layer type (over layers and seeds) |", "| --- | --- | --- |", *lines]


def drop_table(grid, tasks_ranks) -> list[str]:
    lines = ["| task, rank | seed | metric (all adapters) | without top-25% rank layers (mean rank) | without bottom-25% (mean rank) |",
             "| --- | --- | --- | --- | --- |"]
    for task, rank in tasks_ranks:
        for seed, r in sorted(grid.get((task, rank, "elalora"), {}).items()):
            scale = 100 if r["metric_name"] == "accuracy" else 1
            top, bottom = r["drop"]["top"], r["drop"]["bottom"]
            lines.append(f"| {task}, r{rank} | {seed} | {r['metric'] * scale:.2f} | {top['metric'] * scale:.2f} ({top['mean_rank']:.2f}) "
                         f"| {bottom['metric'] * scale:.2f} ({bottom['mean_rank']:.2f}) |")
    return lines


def repro_lines(results: list[dict]) -> list[str]:
    first = {r["key"][:-2]: r for r in results if r.get("repeat") == 0 and "error" not in r}
    lines = []
    for r in results:
        if r.get("repeat") == 1 and "error" not in r and r["key"][:-2] in first:
            a = first[r["key"][:-2]]
            same = a["metric"] == r["metric"] and a["final_loss"] == r["final_loss"] and a["ranks"] == r["ranks"]
            lines.append(f"- {r['key'][:-2]}: first run {a['metric']!r} (final loss {a['final_loss']!r}), rerun {r['metric']!r} "
                         f"(final loss {r['final_loss']!r}); ranks identical: {a['ranks'] == r['ranks']} -> {'identical' if same else 'DIFFERENT'}")
    return lines


def plot_ranks(grid, tasks_ranks, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, r) for t, r in tasks_ranks if grid.get((t, r, "elalora"))]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, (task, rank) in enumerate(panels):
        ax = axes[0][col]
        methods = [m for m in ("elalora", "adalora") if grid.get((task, rank, m))]
        types = list(rank_by_type(grid[(task, rank, "elalora")]))
        for i, m in enumerate(methods):
            means = rank_by_type(grid[(task, rank, m)])
            ax.bar([x + 0.4 * i for x in range(len(types))], [means.get(t, 0) for t in types], width=0.4, label=m)
        ax.axhline(rank, color="grey", linestyle="--", linewidth=1, label=f"start / target r = {rank}")
        ax.set_xticks([x + 0.2 for x in range(len(types))], types)
        ax.set_title(f"{task} r{rank}: mean final rank by layer type")
        ax.legend(fontsize=7)
        runs = grid[(task, rank, "elalora")]
        depth = 1 + max(layer_type(n)[1] for n in next(iter(runs.values()))["ranks"])
        heat = [[0.0] * len(types) for _ in range(depth)]
        for r in runs.values():
            for name, value in r["ranks"].items():
                t, d = layer_type(name)
                heat[d][types.index(t)] += value / len(runs)
        ax = axes[1][col]
        image = ax.imshow(heat, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(types)), types)
        ax.set_ylabel("block")
        ax.set_title(f"{task} r{rank}: ElaLoRA final rank (mean of seeds)")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(results: list[dict], folder: Path) -> Path:
    grid = cells(results)
    tasks_ranks = sorted({(t, r) for t, r, m in grid if m in ("elalora", "lora")})
    errors = [r for r in results if "error" in r]
    main = list(METHOD_ORDER[:4])
    lines = ["# Quality at equal budget (generated by `python bench/quality.py --report`)", ""]
    lines += ["## Quality", ""] + quality_table(grid, tasks_ranks, main, "lora")
    ablated = [(t, r) for t, r in tasks_ranks if any(grid.get((t, r, m)) for m in ABLATIONS)]
    lines += ["## Ablations", ""] + quality_table(grid, ablated, ["elalora", *ABLATIONS], "elalora")
    unregularised = [(t, r) for t, r in tasks_ranks if any(grid.get((t, r, m)) for m in NO_REGULARISER)]
    lines += ["## Orthogonality regulariser off (gamma = 0)", ""]
    lines += quality_table(grid, unregularised, ["lora", "elalora", "elalora-g0", "fixed", "fixed-g0", "adalora", "adalora-g0"], "lora")
    lines += ["## Where rank goes", "", *rank_tables(grid, tasks_ranks), "", "![ranks](quality_ranks.png)", ""]
    lines += ["## Dropping the adapters of the highest- and lowest-rank layers at evaluation", "", *drop_table(grid, tasks_ranks), ""]
    lines += ["## Cost", "", *cost_table(grid, tasks_ranks), ""]
    lines += ["## Reproducibility", "", *(repro_lines(results) or ["- no repeated cell in these results"]), ""]
    wall = sum(r.get("wall_seconds", 0) for r in results)
    lines += [f"{len(results)} runs, {len(errors)} failed; {wall / 60:.0f} min of cell wall time in all."]
    lines += [f"- failed: {r['key']}: {r['error']}" for r in errors]
    plot_ranks(grid, tasks_ranks, folder / "quality_ranks.png")
    path = folder / "quality.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


# ---------------------------------------------------------------- suites of variants (sweep, confirm)


def run_label(r: dict) -> str:
    """method[variant], with @lr / @steps when the cell overrode the task's."""
    label = f"{r['method']}[{r['variant']}]" if r.get("variant") else r["method"]
    if r.get("lr"):
        label += f"@lr{r['lr']:g}"
    return label


def variant_table(results: list[dict], baseline: str = "lora") -> list[str]:
    """Per (task, rank, split, steps): every label, best first, with paired deltas against `baseline`."""
    groups: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        if "error" not in r and r.get("repeat", 0) == 0:
            groups[(r["task"], r["rank"], r.get("split", "test"), r["steps"])][run_label(r)][r["seed"]] = r
    lines = []
    requested = baseline
    for (task, rank, split, steps), labels in sorted(groups.items()):
        # PEFT LoRA as run in this group: plain, or at equal bytes (`lora[eqbytes]`)
        baseline = requested if requested in labels else next((lb for lb in labels if lb.startswith(requested + "[")), requested)
        metric = next(iter(next(iter(labels.values())).values()))["metric_name"]
        scale = 100 if metric == "accuracy" else 1
        sign = -1 if HIGHER_IS_BETTER[metric] else 1
        lines += [f"**{task}, rank {rank}, {steps} steps, {split} split** ({metric}{', %' if scale == 100 else ''}; "
                  f"{'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better; paired Δ over shared seeds)", "",
                  f"| configuration | seeds | mean ± sd | every run (seed: value) | paired Δ vs {baseline} | final total rank | LoRA rank | adapter state (MiB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ordered = sorted(labels.items(), key=lambda kv: sign * statistics.fmean(r["metric"] for r in kv[1].values()))
        for label, runs in ordered:
            each = ", ".join(f"{s}: {runs[s]['metric'] * scale:.2f}" for s in sorted(runs))
            delta = "-" if label == baseline or baseline not in labels else paired_delta(runs, labels[baseline], metric)
            total = statistics.fmean(sum(r["ranks"].values()) for r in runs.values())
            lora_rank = next(iter(runs.values())).get("lora_rank", "")
            state = statistics.fmean(r["state_bytes"] for r in runs.values()) / 2**20
            lines.append(f"| {label} | {len(runs)} | {fmt([r['metric'] for r in runs.values()], metric)} | {each} | {delta} "
                         f"| {total:.0f} | {lora_rank} | {state:.2f} |")
        lines.append("")
    return lines


def write_method_report(suite: str) -> Path:
    folder = Path(__file__).parent / "results"
    path = folder / f"{suite}.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    errors = [r for r in results if "error" in r]
    lines = [f"# Suite `{suite}` (generated by `python bench/quality.py --suite {suite} --report`)", "",
             "Configurations are defined in bench/variants.py; every run is listed.", "", *variant_table(results)]
    wall = sum(r.get("wall_seconds", 0) for r in results)
    lines += [f"{len(results)} runs, {len(errors)} failed; {wall / 60:.0f} min of cell wall time in all."]
    lines += [f"- failed: {r['key']}: {r['error']}" for r in errors]
    out = folder / f"{suite}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return out
