"""Peak memory of each step of `qelalora export`, to extrapolate per layer from few-layer models.

An export's whole-process peak says where the memory is highest, not how each
step grows with depth: on the 8B width the peak is loading the two 2.1 GB
tables whatever the layer count. This runs one export in this process and
samples its RSS every 20 ms, reporting the highest RSS seen inside each step
(loading, reference outputs, tracing, filling, the axis check, the parity
check). Run on 2 and 4 layers of the same width, each step's growth per layer
extrapolates it to the full depth; the largest extrapolated step is the
predicted peak.

    python bench/export_phases.py --models llama-3.1-8b-2layers llama-3.1-8b-4layers --format merged-int4
    python bench/export_phases.py --report

Run folders come from `bench/scale.py` (its `train` step). Rows go to
`bench/results/export_phases.jsonl`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "export_phases.jsonl"
# (module, attribute): the exporter's steps, in the order they run
STEPS = [
    ("qelalora.export.exporter", "load_trained"),
    ("qelalora.export.parity", "reference_outputs"),
    ("qelalora.export.graphs", "export_decoder_with_cache"),
    ("qelalora.export.streamed", "fill_placeholders"),
    ("optimum.exporters.onnx.base", "OnnxConfig.fix_dynamic_axes"),
    ("qelalora.export.parity", "check"),
]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class Sampler:
    """The highest RSS since `reset`, sampled on a thread."""

    def __init__(self, every: float = 0.02):
        self.high, self.every = rss_mib(), every
        self.top = self.high  # the whole run's
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            now = rss_mib()
            self.high, self.top = max(self.high, now), max(self.top, now)
            time.sleep(self.every)

    def reset(self) -> float:
        high, self.high = self.high, rss_mib()
        return high


def instrument(sampler: Sampler, peaks: dict[str, float]) -> None:
    """Wrap each step so that its peak (the high-water mark while it runs) lands in `peaks`."""
    for module_name, attr in STEPS:
        owner = importlib.import_module(module_name)
        holder, name = (getattr(owner, attr.split(".")[0]), attr.split(".")[1]) if "." in attr else (owner, attr)
        original = getattr(holder, name)

        @functools.wraps(original)
        def step(*args, __original=original, __name=attr, **kwargs):
            outer = sampler.reset()
            try:
                return __original(*args, **kwargs)
            finally:
                peaks[__name] = max(peaks.get(__name, 0.0), sampler.reset())
                sampler.high = max(sampler.high, outer)

        setattr(holder, name, step)


def measure(run_dir: Path, fmt: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from qelalora.export import exporter

    sampler, peaks = Sampler(), {}
    instrument(sampler, peaks)
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        exporter.export_run(run_dir, Path(out) / "onnx", fmt, overwrite=True, metric_examples=8, log=lambda *a: None)
    return {"steps_peak_mib": {k: round(v) for k, v in peaks.items()}, "process_peak_mib": round(sampler.top),
            "seconds": round(time.time() - started, 1)}


def report(rows: list[dict]) -> None:
    """Each step's peak per model, and for pairs of one width at two depths the per-layer growth and the full
    depth's predicted peak."""
    latest = {(r["model"], r["format"]): r for r in rows}
    for (model, fmt), r in latest.items():
        print(f"{model} {fmt}: " + ", ".join(f"{k} {v:,}" for k, v in r["steps_peak_mib"].items()))
    by_width: dict[tuple[str, str], list[dict]] = {}
    for (model, fmt), r in latest.items():
        by_width.setdefault((r["width"], fmt), []).append(r)
    for (width, fmt), pair in by_width.items():
        if len(pair) < 2:
            continue
        few, more = sorted(pair, key=lambda r: r["layers"])[:2]
        full = few["full_layers"]
        print(f"\n{width} {fmt}: per layer and at {full} layers ({few['layers']} -> {more['layers']} layers)")
        print("| step | per layer MiB | predicted at full depth MiB |\n|---|---|---|")
        predicted = {}
        for step, low in few["steps_peak_mib"].items():
            high = more["steps_peak_mib"].get(step, low)
            slope = (high - low) / (more["layers"] - few["layers"])
            predicted[step] = low + slope * (full - few["layers"])
            print(f"| {step} | {slope:,.0f} | {predicted[step]:,.0f} |")
        step = max(predicted, key=predicted.get)
        print(f"predicted peak: {predicted[step]:,.0f} MiB ({step})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--format", default="merged-int4")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    for name in args.models:  # one process per model: a step's peak must not include an earlier model's heap
        subprocess.run([sys.executable, __file__, "--child-run", name, args.format], check=True)
    report([json.loads(line) for line in RESULTS.open()] if RESULTS.exists() else [])


def child(name: str, fmt: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from scale import CACHE, MODELS

    config, full_layers, _ = MODELS[name]
    row = {"model": name, "format": fmt, "width": name.rsplit("-", 1)[0] if name.endswith("layers") else name,
           "layers": config["num_hidden_layers"], "full_layers": full_layers, "date": time.strftime("%Y-%m-%d"),
           **measure(CACHE / "runs" / name / "run", fmt)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name} {fmt}: process peak {row['process_peak_mib']:,} MiB; " +
          ", ".join(f"{k} {v:,}" for k, v in row["steps_peak_mib"].items()), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-run":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
