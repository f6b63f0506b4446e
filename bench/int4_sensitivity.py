"""Which layers make int4 lose perplexity: one weight-only quantisation per configuration of a merged fp32 graph.

Each configuration quantises every MatMul to 4 bits (RTN, the exporter's
settings) except the layer kinds it names, which get 8 bits; "none" is all
4-bit, "all" all 8-bit. The held-out perplexity of each graph, on the same
seeded sample the exporter's parity check uses, says how much each kind of
layer costs at 4 bits, and so which ones a mixed file should keep at 8.

    python bench/int4_sensitivity.py --run runs/bench-smollm2 \\
        --fp32 bench/out/exports/bench-smollm2-merged-fp32 --examples 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qelalora.export.graph_files import referenced_files  # noqa: E402
from qelalora.export.layout import format_info  # noqa: E402
from qelalora.export.quantise import WeightOnly, quantise_weights  # noqa: E402
from qelalora.export.runtime import EdgeModel  # noqa: E402
from qelalora.export.trained import heldout_examples, load_trained, seeded_sample  # noqa: E402
from qelalora.run.train.evaluate import evaluate  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the trained run (for its held-out examples)")
    parser.add_argument("--fp32", type=Path, required=True, help="its merged-fp32 export folder")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--embeddings", action="store_true", help="the embedding table at 4 bits too (--int4-embeddings)")
    parser.add_argument("--configs", nargs="+", default=["none", *KINDS, "all"],
                        help="layer kinds kept at 8 bits, '+'-joined (e.g. down_proj+v_proj); none; all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int4_sensitivity_smollm2.jsonl")
    args = parser.parse_args()

    run = load_trained(args.run)
    examples = heldout_examples(run, args.examples) if args.split == "test" else seeded_sample(run.data.val, args.examples)
    if args.split == "test":
        reference = format_info(args.fp32, "merged-fp32")["parity"]["metric_pytorch"]
    else:
        with torch.no_grad():
            reference = evaluate(run.model, examples, run.task, 8, run.data.pad_id, "cpu")["perplexity"]
    graph = format_info(args.fp32, "merged-fp32")["file"]
    fp32_bytes = sum(p.stat().st_size for p in referenced_files(args.fp32 / graph))  # the graph and its data file
    for config in args.configs:
        eight = () if config == "none" else KINDS if config == "all" else tuple(config.split("+"))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "graph"
            shutil.copytree(args.fp32, folder)
            started = time.time()
            quantise_weights(folder / graph, 4, WeightOnly(int8_layers=eight, embeddings=args.embeddings))
            seconds = time.time() - started
            size = (folder / graph).stat().st_size
            perplexity = EdgeModel(folder).evaluate(examples)["perplexity"]
        row = {"config": config, "int8_layers": list(eight), "split": args.split, "embeddings": args.embeddings,
               "perplexity": perplexity, "pytorch_nf4": reference, "ratio": perplexity / reference, "bytes": size, "x_fp32": size / fp32_bytes,
               "quantise_s": round(seconds, 1), "examples": len(examples), "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
