"""Export defaults chosen on validation rows: each candidate exported from one run and scored on the run's
validation split with ONNX Runtime (`qelalora eval --split val`), so that no default rests on test numbers.

Questions (each a list of candidates; the first is the current default):
  accuracy-level  merged-int4 (decoder mix) with int8 activations (4) or ONNX Runtime's default (0)
  encoder-table   an encoder's merged-int4 with the float table or the 4-bit table (--int4-embeddings)
  encoder-algo    an encoder's merged-int4 with RTN or GPTQ
  genai           genai int4-mixed against the builder's int4

    python bench/export_choice.py --question accuracy-level --run runs/bench-smollm2
    python bench/export_choice.py --question encoder-table --run runs/default
    python bench/export_choice.py --question genai --run runs/bench-smollm2 --limit 100
The decoder's 8-bit layer mix is chosen with bench/int4_sensitivity.py --split val.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = {
    "accuracy-level": [("acc4", ["-f", "merged-int4"]), ("acc0", ["-f", "merged-int4", "--accuracy-level", "0"])],
    "encoder-table": [("float-table", ["-f", "merged-int4"]), ("int4-table", ["-f", "merged-int4", "--int4-embeddings"])],
    # both with a float table (ONNX Runtime's GPTQ path leaves the table alone), so only the algorithm differs
    "encoder-algo": [("rtn", ["-f", "merged-int4", "--no-int4-embeddings"]), ("gptq", ["-f", "merged-int4", "--int4-algo", "gptq"])],
    "genai": [("int4-mixed", ["-f", "genai"]), ("int4", ["-f", "genai", "--genai-precision", "int4"])],
}


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "qelalora", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"qelalora {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", choices=sorted(QUESTIONS), required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("bench/out/export_choice"))
    parser.add_argument("--limit", type=int, help="validation examples scored (default: the whole split)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_choice.jsonl")
    args = parser.parse_args()
    for name, export_args in QUESTIONS[args.question]:
        folder = args.work / f"{args.run.name}-{args.question}-{name}"
        started = time.time()
        _cli("export", str(args.run), *export_args, "-o", str(folder), "--overwrite", "--metric-examples", "8")
        exported = time.time() - started
        summary = json.loads((folder / "qelalora_export.json").read_text())
        fmt = export_args[1]
        entry = summary["formats"][fmt]
        size = sum(v for k, v in entry["files"].items() if k.startswith(("onnx/", "model.onnx")) and not k.endswith(".ort"))
        limit = ["--limit", str(args.limit)] if args.limit else []
        scored = json.loads(_cli("eval", str(folder), "-f", fmt, "--split", "val", *limit).strip().splitlines()[-1])
        row = {"question": args.question, "candidate": name, "run": str(args.run), "split": "val", **scored,
               "bytes": size, "export_s": round(exported, 1), "args": export_args, "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
