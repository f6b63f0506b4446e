"""What keeping the adapters apart costs in ONNX Runtime GenAI: `genai` merged against `genai --genai-adapters`
(a merged-free base with an adapter input pair per projection, the run's adapter in an og.Adapters file).

Both folders are exported from one run at one precision and timed in the same process, alternately, so machine
noise falls on both: the decode step (one token appended to a generator holding a 128-token prompt) and the
prefill (a fresh generator over the prompt), medians of `--repeats`; bytes of the graph, its data and the adapter;
and whether both generate the same 32 greedy tokens.

    python bench/genai_adapters.py runs/smollm2 --precision int4-mixed --out bench/results/genai_adapters_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from export_latency import genai_decode_step  # noqa: E402

from qelalora.export.exporter import export_run  # noqa: E402
from qelalora.export.layout import format_info  # noqa: E402
from qelalora.export.runtime import open_export  # noqa: E402


def _bytes(folder: Path) -> int:
    info = format_info(folder, "genai")
    names = [n for n in info["files"] if n.startswith(("model.onnx", "adapters/"))]
    return sum(info["files"][n] for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--precision", default="int4-mixed")
    parser.add_argument("--work", type=Path, default=Path("bench/out/genai_adapters"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folders = {"merged": args.work / "merged", "adapters": args.work / "adapters"}
    infos = {}
    for label, folder in folders.items():
        infos[label] = export_run(args.run, folder, "genai", overwrite=True, genai_precision=args.precision,
                                  genai_adapters=label == "adapters", log=print)
    models = {label: open_export(folder) for label, folder in folders.items()}
    prompt = models["merged"].tokenizer("def add(a, b):\n    " * 16)["input_ids"][:128]
    decode, prefill = {k: [] for k in models}, {k: [] for k in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            step = genai_decode_step(model, prompt, args.repeats)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step()
                decode[label].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model._generator(prompt, len(prompt) + 1)
            prefill[label].append(time.perf_counter() - t0)
    tokens = {label: model.generate_ids(prompt[:32], 32) for label, model in models.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "run": str(args.run), "precision": args.precision, "prompt_tokens": len(prompt),
        "bytes": {k: _bytes(f) for k, f in folders.items()},
        "decode_s": {k: statistics.median(v) for k, v in decode.items()},
        "prefill_s": {k: statistics.median(v) for k, v in prefill.items()},
        "perplexity": {k: i["parity"]["metric_onnx"] for k, i in infos.items()},
        "perplexity_pytorch": infos["merged"]["parity"]["metric_pytorch"],
        "greedy_equal_to_pytorch": {k: i["parity"].get("greedy_tokens_equal") for k, i in infos.items()},
        "same_32_tokens": tokens["merged"] == tokens["adapters"],
        "total_rank": sum(infos["adapters"]["ranks"].values()),
    }
    result["decode_ratio"] = result["decode_s"]["adapters"] / result["decode_s"]["merged"]
    result["prefill_ratio"] = result["prefill_s"]["adapters"] / result["prefill_s"]["merged"]
    result["bytes_ratio"] = result["bytes"]["adapters"] / result["bytes"]["merged"]
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
