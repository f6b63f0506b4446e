"""The export folder: the Hugging Face Hub layout, which transformers.js, optimum and qelalora's runtime open as it is.

    folder/
      config.json, generation_config.json, tokenizer files   shared by every precision of one run
      qelalora_export.json                                   the run's summary, one entry per exported format
      onnx/model.onnx, onnx/model_q4.onnx, ...              one graph per precision, named as transformers.js
                                                             names them (its `dtype` option picks one)
      onnx/<graph>_data                                      a large graph's weights (`model.onnx_data`)

Several precisions of one run share a folder; `config.json`'s `transformers.js_config` names the default one (the
smallest written) and the graphs that keep external data. An ONNX Runtime GenAI export (`genai`) keeps GenAI's own
layout (`genai_config.json`, `model.onnx`) in a folder of its own. Torch-free: the runtime reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from qelalora.errors import RunDirError, UserError
from qelalora.run.folder.layout import RunFolder, write_json_atomic

from .graph_files import referenced_files

SUMMARY = "qelalora_export.json"
GRAPH_DIR = "onnx"
ADAPTER_FILE = "adapter.onnx_adapter"
GENAI = "genai"

# format -> (graph file under onnx/, transformers.js dtype or None when transformers.js cannot run the graph)
GRAPHS = {
    "merged-int4": ("model_q4.onnx", "q4"),
    "merged-int8": ("model_quantized.onnx", "q8"),
    "merged-int8-dynamic": ("model_int8.onnx", "int8"),
    "merged-fp16": ("model_fp16.onnx", "fp16"),
    "merged-fp32": ("model.onnx", "fp32"),
    "nf4-adapters": ("model_bnb4.onnx", "bnb4"),
    "swappable": ("model_swappable.onnx", None),  # its adapter weights are graph inputs, fed from the adapter file
}
# transformers.js's default dtype for a folder: the first of these written (GRAPHS' order: smallest first)
PREFERRED = [f for f, (_, dtype) in GRAPHS.items() if dtype]


def graph_file(fmt: str) -> str:
    """The graph's path relative to the folder."""
    return "model.onnx" if fmt == GENAI else f"{GRAPH_DIR}/{GRAPHS[fmt][0]}"


def read_summary(folder: Path) -> dict:
    """The folder's summary as {shared fields..., "formats": {format: entry}}. A folder written before the Hub
    layout (one format, `model.onnx` at the top) reads as a folder holding that one format."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        raise UserError(f"{folder} is not a qelalora export (no {SUMMARY}); run qelalora export first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read ({err})") from None
    if "formats" not in summary:  # one format, flat
        fmt = summary.pop("format")
        keep = ("task", "base_model", "num_labels", "label_names", "eos_token_id", "pad_token_id", "data", "ranks")
        entry = {k: v for k, v in summary.items() if k not in keep}
        adapter = Path(folder) / ADAPTER_FILE
        summary = {**{k: summary.get(k) for k in keep}, "formats": {fmt: {
            **entry, "file": "model.onnx", "adapter": ADAPTER_FILE if adapter.is_file() else None}}}
    return summary


def format_info(folder: Path, fmt: str | None = None) -> dict:
    """One format's view of the folder: the shared fields, that format's entry and `format`. Without `fmt`, the
    folder's only format, or with several the one transformers.js opens by default."""
    summary = read_summary(folder)
    formats = summary["formats"]
    if fmt is None:
        fmt = next((f for f in PREFERRED if f in formats), next(iter(formats)))
    if fmt not in formats:
        raise UserError(f"{folder} holds no {fmt} export; it holds: {', '.join(formats)}")
    if not (Path(folder) / formats[fmt]["file"]).is_file():
        raise UserError(f"{folder} is missing {formats[fmt]['file']} ({fmt}); export it again")
    shared = {k: v for k, v in summary.items() if k != "formats"}
    return {**shared, **formats[fmt], "format": fmt}


def run_fingerprint(run_dir: Path) -> str:
    """What identifies a trained run's weights: the SHA-256 of its adapter files (precisions of one run may share
    a folder; another run's may not)."""
    digest = hashlib.sha256()
    folder = RunFolder(Path(run_dir))
    for path in (folder.adapter_weights, folder.adapter_config):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _format_files(folder: Path, entry: dict) -> list[Path]:
    graph = folder / entry["file"]
    found = referenced_files(graph) if graph.is_file() else set()
    if entry.get("adapter"):
        found.add(folder / entry["adapter"])
    if entry.get("mobile"):
        found |= {folder / entry["mobile"]["file"], folder / entry["mobile"]["operators"]}
    return sorted(found)


def write_transformers_js_config(folder: Path, formats: dict) -> None:
    """`config.json`'s `transformers.js_config`: the default dtype (the smallest graph written) and which graphs
    keep their weights in an external data file (transformers.js fetches `<graph>_data` only when told)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    runnable = [f for f in PREFERRED if f in formats]
    external = {Path(e["file"]).name: 1 for f, e in formats.items()
                if f in runnable and (folder / (e["file"] + "_data")).is_file()}
    settings = {"dtype": GRAPHS[runnable[0]][1]} if runnable else {}
    if external:
        settings["use_external_data_format"] = external
    if settings:
        config["transformers.js_config"] = settings
    else:
        config.pop("transformers.js_config", None)
    write_json_atomic(path, config)


def check_destination(out_dir: Path, fmt: str, run_dir: Path, overwrite: bool) -> str:
    """What exporting `fmt` of `run_dir` to `out_dir` will do: "new" (no folder, or an empty one), "add" (a
    precision added to, or with `overwrite` replaced in, the same run's folder) or "replace" (with `overwrite`, the
    whole folder). Refused without `overwrite` when the folder holds anything else or this precision already."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "new"
    reason, shared = _cannot_share(out_dir, fmt, run_fingerprint(run_dir))
    if shared and fmt in read_summary(out_dir)["formats"] and not overwrite:
        reason = f"holds a {fmt} export already"
    if reason and not overwrite:
        raise RunDirError(f"{out_dir} is not empty and {reason}; pass --overwrite to replace it")
    return "add" if shared else "replace"


def publish(tmp: Path, out_dir: Path, fmt: str, run_dir: Path, overwrite: bool) -> None:
    """Put a checked export (`tmp`, one format) in place, as `check_destination` said."""
    action = check_destination(out_dir, fmt, run_dir, overwrite)
    if action == "add":
        _add_precision(tmp, out_dir, fmt)
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a temporary folder is private (0700); the export is a folder like any other
    tmp.rename(out_dir)


def _cannot_share(out_dir: Path, fmt: str, fingerprint: str) -> tuple[str | None, bool]:
    """(why `out_dir` cannot take this precision beside its own, or None; whether it is this run's folder)."""
    try:
        old = read_summary(out_dir)
    except UserError:
        return "is not a qelalora export", False
    if fmt == GENAI or GENAI in old["formats"]:
        return "ONNX Runtime GenAI exports keep a folder of their own", False
    if any(e.get("file") == "model.onnx" for e in old["formats"].values()):
        return "holds an export in the older flat layout", False
    if old.get("run_fingerprint") != fingerprint:
        return "holds the export of another run", False
    return None, True


def _add_precision(tmp: Path, out_dir: Path, fmt: str) -> None:
    """Move one format's files from `tmp` into `out_dir`, then its summary entry and the shared config."""
    new, summary = read_summary(tmp), read_summary(out_dir)
    old_entry = summary["formats"].get(fmt)
    if old_entry:
        for path in _format_files(out_dir, old_entry):
            path.unlink(missing_ok=True)
    (out_dir / GRAPH_DIR).mkdir(exist_ok=True)
    entry = new["formats"][fmt]
    for path in _format_files(tmp, entry):
        os.replace(path, out_dir / path.relative_to(tmp))
    summary["formats"][fmt] = entry
    write_json_atomic(out_dir / SUMMARY, summary)
    write_transformers_js_config(out_dir, summary["formats"])
