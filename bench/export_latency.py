"""Exported formats side by side: size, ONNX Runtime CPU latency, ratio to PyTorch NF4, metric delta.

Takes finished runs (train them first, see BENCHMARKS.md), exports each in
every format, and times in one process, interleaved with the PyTorch NF4
model the run trained:
- encoders: a forward at batch 1 and batch 8 (sequence = the recipe's max_length);
- decoders: a 128-token prefill and per-token greedy decode with the KV cache,
  and the decode time against the memory-bandwidth bound (bytes of weights
  read per token / measured read bandwidth of this machine).

    python bench/export_latency.py --run runs/bench-minilm --run runs/bench-smollm2 [--repeats 15]
    python bench/export_latency.py --run runs/bench-smollm2 --formats merged-fp32 merged-int4 merged-int8 \
        --int4-algos rtn hqq k-quant gptq --accuracy-levels default 4
    python bench/export_latency.py --run runs/bench-smollm2 --formats merged-int4 genai --genai-precisions int4 fp32

`genai` folders run in ONNX Runtime GenAI (`og.Generator`): prefill is one
`append_tokens` of the prompt, a decode step one more appended token.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from qelalora.export.exporter import FORMATS, export_run
from qelalora.export.quantise import HEADS, INT4_ALGOS, WeightOnly
from qelalora.export.layout import SUMMARY, format_info
from qelalora.export.runtime import EdgeModel, GenaiModel, open_export
from qelalora.export.trained import heldout_examples, load_trained

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
EXPORTS = Path("bench/out/exports")  # the exported folders (GBs; bench/out is not versioned)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth() -> float:
    """Bytes per second this machine reads: a sum over 1 GiB with all of torch's threads (as ORT uses them)."""
    data = torch.ones(256 * 2**20, dtype=torch.float32)
    t = median_time(lambda: data.sum(), 5)
    return data.numel() * data.element_size() / t


def weight_bytes(path: Path) -> int:
    """Bytes a decode step must read: every initializer except tables only looked up by Gather (one row per token)."""
    graph = onnx.load(str(path)).graph
    gathered, used_otherwise = set(), set()
    for node in graph.node:
        for i, name in enumerate(node.input):
            (gathered if node.op_type == "Gather" and i == 0 else used_otherwise).add(name)
    return sum(
        onnx.numpy_helper.to_array(init).nbytes
        for init in graph.initializer
        if init.name in used_otherwise or init.name not in gathered
    )


def encoder_rows(run, batch: int) -> list[list[int]]:
    examples = heldout_examples(run, batch)
    width = run.recipe.data.max_length
    return [(list(e["input_ids"]) + [run.tokenizer.pad_token_id or 0] * width)[:width] for e in examples[:batch]]


def torch_encoder(run, rows):
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    return lambda: run.model(input_ids=ids, attention_mask=mask)


def torch_decode_step(run, prompt: list[int]):
    """PyTorch NF4: one greedy decode step after a prefill of `prompt` (cache rebuilt each time)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = run.model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step():
        import copy

        run.model(input_ids=nxt, past_key_values=copy.deepcopy(past), use_cache=True)

    return step


def edge_decode_step(edge: EdgeModel, prompt: list[int]):
    names = [o.name for o in edge.session.get_outputs()]
    feed = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), dtype=np.int64),
            "position_ids": np.arange(len(prompt))[None], **edge._empty_past(1)}
    outs = dict(zip(names, edge.session.run(names, feed)))
    step_feed = {"input_ids": np.array([[int(outs["logits"][0, -1].argmax())]]),
                 "attention_mask": np.ones((1, len(prompt) + 1), dtype=np.int64), "position_ids": np.array([[len(prompt)]])}
    for n in names:
        if n.startswith("present."):
            step_feed["past_key_values." + n[len("present."):]] = outs[n]
    return lambda: edge.session.run(["logits"], step_feed)


def genai_decode_step(edge: GenaiModel, prompt: list[int], repeats: int):
    """One more token appended to a generator that holds the prompt (its KV cache grows by one per call)."""
    generator = edge._generator(prompt, len(prompt) + repeats + 8)
    token = np.array([int(generator.get_output("logits")[0, -1].argmax())], dtype=np.int32)
    return lambda: generator.append_tokens(token)


def variants(formats: list[str], int4_algos: list[str], accuracy_levels: list[int | None],
             heads: tuple[str, ...] = ("same",), genai_precisions: tuple[str, ...] = ("int4",),
             int8_sets: tuple[str, ...] = ("",), embeddings: bool = False) -> list[tuple[str, str, object]]:
    """(label, format, weight-only settings or genai precision): each int4 algorithm, CPU compute type, head choice,
    set of 8-bit layers and genai precision is its own row."""
    out = []
    for fmt in formats:
        if fmt == "genai":
            out.extend((f"genai[{p}]", fmt, p) for p in genai_precisions)
        elif fmt in ("merged-int4", "merged-int8"):
            algos = int4_algos if fmt == "merged-int4" else ["rtn"]
            sets = int8_sets if fmt == "merged-int4" else ("",)
            for algo, level, head, eight in ((a, l, h, e) for a in algos for l in accuracy_levels for h in heads for e in sets):
                if fmt == "merged-int8" and head == "int8":
                    continue  # the same as "same"
                emb = embeddings and fmt == "merged-int4"
                tags = ([] if algo == "rtn" else [algo]) + ([] if level is None else [f"acc{level}"]) + ([] if head == "same" else [f"head-{head}"])
                tags += ([f"int8-{eight.replace(',', '-')}"] if eight else []) + (["emb4"] if emb else [])
                label = f"{fmt}[{','.join(tags)}]" if tags else fmt
                out.append((label, fmt, WeightOnly(algo, accuracy_level=level, head=head, embeddings=emb,
                                                   int8_layers=tuple(n for n in eight.split(",") if n))))
        else:
            out.append((fmt, fmt, WeightOnly()))
    return out


def bench_run(run_dir: Path, out_root: Path, repeats: int, bandwidth: float, metric_examples: dict,
              rows: list[tuple[str, str, WeightOnly]], reuse: bool = False) -> dict:
    run = load_trained(run_dir)
    causal = run.task == "causal-lm"
    result = {"run": str(run_dir), "model": run.recipe.model.name, "task": run.task, "formats": {}}
    with torch.no_grad():
        if causal:
            prompt = list(heldout_examples(run, 1)[0]["input_ids"][:128])
            ids = torch.tensor([prompt])
            torch_times = {"prefill_128": median_time(lambda: run.model(input_ids=ids), repeats),
                           "decode_token": median_time(torch_decode_step(run, prompt), repeats)}
        else:
            rows1, rows8 = encoder_rows(run, 1), encoder_rows(run, 8)
            torch_times = {"batch_1": median_time(torch_encoder(run, rows1), repeats),
                           "batch_8": median_time(torch_encoder(run, rows8), repeats)}
    result["pytorch_nf4_s"] = torch_times
    for label, fmt, quant in rows:
        if (causal and fmt == "swappable") or (not causal and fmt == "genai"):
            continue  # logits-only decoder graph: no KV cache to time decode with; genai is for decoders
        folder = out_root / f"{run_dir.name}-{label.replace('[', '-').replace(']', '').replace(',', '-')}"
        settings = {"genai_precision": quant} if fmt == "genai" else {"quant": quant}
        if reuse and (folder / SUMMARY).is_file():  # exported and checked by an earlier run with these settings
            info = format_info(folder, fmt)
        else:
            info = export_run(run_dir, folder, fmt, overwrite=True, metric_examples=metric_examples[run.task],
                              log=lambda *a: None, **settings)
        edge = open_export(folder)
        if causal:
            step = genai_decode_step(edge, prompt, repeats) if fmt == "genai" else edge_decode_step(edge, prompt)
            times = {"prefill_128": median_time(lambda: edge.logits([prompt]), repeats),
                     "decode_token": median_time(step, repeats)}
            read = weight_bytes(folder / info["file"])
            times["bandwidth_bound_s"] = read / bandwidth
            times["decode_vs_bound"] = times["decode_token"] / times["bandwidth_bound_s"]
            times["weight_bytes_read_per_token"] = read
        else:
            times = {"batch_1": median_time(lambda: edge.logits(rows1), repeats),
                     "batch_8": median_time(lambda: edge.logits(rows8), repeats)}
        ratios = {k: times[k] / torch_times[k] for k in torch_times}
        parity = info["parity"]
        result["formats"][label] = {
            "bytes": sum(v for n, v in info["files"].items() if n.startswith(("onnx/", "model.onnx"))),  # graph, data, adapter
            "ort_s": times,
            "ratio_to_pytorch_nf4": ratios,
            "max_abs_logit_diff": parity["max_abs_logit_diff"],
            "metric": parity["metric"],
            "metric_pytorch": parity["metric_pytorch"],
            "metric_delta": parity["metric_delta"],
        }
        print(json.dumps({label: result["formats"][label]}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cls-examples", type=int, default=1000, help="held-out examples for the accuracy delta")
    parser.add_argument("--lm-examples", type=int, default=100, help="held-out blocks for the perplexity delta")
    parser.add_argument("--out", type=Path, default=Path("bench/out/export_latency.json"))
    onnx_formats = [f for f in FORMATS if f != "genai"]  # genai (decoders, an optional extra) only when named
    parser.add_argument("--formats", nargs="+", default=onnx_formats, choices=FORMATS)
    parser.add_argument("--reuse", action="store_true",
                        help="time folders an earlier run exported (same settings) instead of exporting again")
    parser.add_argument("--genai-precisions", nargs="+", default=["int4-mixed"], choices=["int4-mixed", "int4", "fp16", "fp32"])
    parser.add_argument("--int4-algos", nargs="+", default=["rtn"], choices=INT4_ALGOS)
    parser.add_argument("--accuracy-levels", nargs="+", default=["default"], choices=["default", "1", "2", "3", "4"],
                        help="MatMulNBits CPU compute types to compare (default = ONNX Runtime's choice)")
    parser.add_argument("--heads", nargs="+", default=["same"], choices=list(HEADS),
                        help="how the output projection is quantised: like the rest, 8-bit, or float (compare several)")
    parser.add_argument("--int8-layers", nargs="+", default=[""], metavar="NAMES",
                        help="merged-int4: sets of layers kept at 8 bits, each comma-joined (\"\" = none; compare several)")
    parser.add_argument("--int4-embeddings", action="store_true", help="merged-int4: the embedding table at 4 bits too")
    args = parser.parse_args()
    levels = [None if v == "default" else int(v) for v in args.accuracy_levels]
    rows = variants(args.formats, args.int4_algos, levels, tuple(args.heads), tuple(args.genai_precisions),
                    tuple(args.int8_layers), args.int4_embeddings)
    torch.set_grad_enabled(False)
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.2f} GB/s")
    report = {"date": time.strftime("%Y-%m-%d"), "read_bandwidth_bytes_per_s": bandwidth, "torch_threads": torch.get_num_threads(),
              "runs": [bench_run(r, EXPORTS, args.repeats, bandwidth,
                                 {"seq-cls": args.cls_examples, "causal-lm": args.lm_examples}, rows, args.reuse)
                       for r in args.run]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
