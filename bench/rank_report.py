"""Rank curves from the rank suites' results (bench/rank_tasks.py), as markdown tables.

    python bench/rank_report.py bench/results/rank_de.jsonl bench/results/rank_minilm200.jsonl

Per task and method: one row per rank, the metric per seed, the mean, the change against the
lowest rank on the same seeds (perplexity: relative %, lower is better; accuracy: points), and
the cells' wall and training seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _fmt(metric_name: str, value: float) -> str:
    return f"{value:.3f}" if metric_name == "perplexity" else f"{100 * value:.1f}"


def _change(metric_name: str, value: float, base: float) -> float:
    return 100 * (value / base - 1) if metric_name == "perplexity" else 100 * (value - base)


def tables(rows: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["task"], r["method"] + (f"[{r['variant']}]" if r.get("variant") else ""), r["split"])].append(r)
    out = []
    for (task, method, split), runs in sorted(groups.items()):
        name = runs[0]["metric_name"]
        seeds = sorted({r["seed"] for r in runs})
        by = {(r["rank"], r["seed"]): r for r in runs}
        ranks = sorted({r["rank"] for r in runs})
        low = ranks[0]
        unit = f"% vs r = {low}, same seeds" if name == "perplexity" else f"points vs r = {low}, same seeds"
        shown = "perplexity" if name == "perplexity" else "accuracy %"
        out += [f"**{task} / {method}, {split} split** ({shown}; {runs[0]['steps']} steps)", "",
                "| rank | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean | Δ ({unit}) | wall s (train s) per cell |",
                "|---" * (len(seeds) + 4) + "|"]
        for rank in ranks:
            cells = [by.get((rank, s)) for s in seeds]
            values = [c["metric"] for c in cells if c]
            paired = [_change(name, by[(rank, s)]["metric"], by[(low, s)]["metric"]) for s in seeds
                      if (rank, s) in by and (low, s) in by]
            delta = "-" if rank == low or not paired else (
                f"{statistics.fmean(paired):+.2f}" + (f" ± {statistics.stdev(paired):.2f} (n={len(paired)})" if len(paired) > 1 else ""))
            walls = ", ".join(f"{c['wall_seconds']:.0f} ({c['train_seconds']:.0f})" for c in cells if c)
            out.append(f"| {rank} | " + " | ".join(_fmt(name, c["metric"]) if c else "" for c in cells)
                       + f" | {_fmt(name, statistics.fmean(values))} | {delta} | {walls} |")
        out.append("")
    return out


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    print("\n".join(tables(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
