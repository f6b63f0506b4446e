"""One process against several on the same machine: the default job's training loop at the same global batch.

Runs `qelalora train` (the embedded MiniLM-L6 job) with 1 process at batch B
and with N processes at batch B / N each (the same global batch, the same
data order), alternating, and reports the median loop time (report.json's
`train_loop`: steps only, no loading or evaluation), the speed-up and the test
accuracy of each. On a 2-core CPU the processes share the cores (1 thread
each), so this measures the cost of the all-reduce and of splitting the
work, not more hardware.

    python bench/processes.py [--steps 100] [--nproc 2] [--repeats 3] [--out bench/results/processes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(nproc: int, steps: int, batch: int, folder: Path, threads: int) -> dict:
    command = [sys.executable, "-m", "qelalora", "train", "--steps", str(steps), "-o", str(folder), "--no-progress",
               "--set", f"train.batch_size={batch}", "--set", "train.checkpoint_every=0", "--set", "data.val_size=200",
               "--set", "data.test_size=500", "--set", f"elalora.delta={max(1, steps // 20)}",
               "--set", f"elalora.t_init={steps // 10}", "--set", f"elalora.t_final={steps // 4}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((folder / "report.json").read_text())
    return {"nproc": nproc, "batch_per_process": batch, "loop_seconds": report["train_loop"]["seconds"],
            "wall_seconds": round(time.time() - started, 1), "test_accuracy": report["metrics"]["test"]["accuracy"],
            "total_rank_final": report["total_rank"]["final"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/processes.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for nproc in (1, args.nproc):
                row = run(nproc, args.steps, args.batch // nproc, Path(tmp) / f"{nproc}-{r}", max(1, cores // nproc))
                rows.append(row)
                print(json.dumps(row), flush=True)
    med = {n: statistics.median(x["loop_seconds"] for x in rows if x["nproc"] == n) for n in (1, args.nproc)}
    summary = {"date": time.strftime("%Y-%m-%d"), "cores": cores, "steps": args.steps, "global_batch": args.batch,
               "median_loop_seconds": med, "speedup": round(med[1] / med[args.nproc], 3), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
