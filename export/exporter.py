"""`qelalora export`: a finished run -> a checked ONNX folder, written all at once.

Steps: load the run (NF4 base + adapters) -> reference outputs on held-out
inputs -> prune -> build the format's graph -> (quantise) -> run it with ONNX
Runtime and compare -> rename the finished temporary folder into place.
Nothing is left half-written: a failure removes the temporary folder.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qelalora.base.footprint import release_free_heap
from qelalora.errors import RunDirError, UserError
from qelalora.run.data.batches import collate
from qelalora.run.folder.layout import RunFolder, read_json, write_json_atomic
from qelalora.units import fmt_mib

from . import genai, graphs, layout
from . import mobile as mobile_format
from . import parity, streamed
from .graph_files import move_graph, unreferenced_files, write_graph
from .layout import ADAPTER_FILE, SUMMARY
from .modules import branch_matrices, nf4_adapter_model
from .prune import DEFAULT_THRESHOLD, prune_adapters
from .quantise import CALIBRATION_EXAMPLES, WeightOnly, quantise_dynamic_int8, quantise_weights
from .runtime import open_export
from .trained import TrainedRun, heldout_examples, load_trained, seeded_sample, set_tokenizer_aside
from .web import PAGE, node_modules, write_page

FORMATS = ("merged-fp32", "merged-fp16", "merged-int4", "merged-int8", "merged-int8-dynamic", "nf4-adapters", "swappable",
           "genai")


def _example_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate(examples[:2], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _heads(run: TrainedRun) -> dict[str, torch.Tensor]:
    """The run's trained head tensors by parameter name (a task's classifier travels with its adapter)."""
    config = read_json(RunFolder(run.run_dir).adapter_config)
    params = dict(run.model.named_parameters())
    return {name: params[name].detach() for name in config["heads"]}


def _swappable_values(run: TrainedRun) -> list[np.ndarray]:
    """Branch matrices of every target layer (empty for rank 0), then head tensors, in graph-input order."""
    out = []
    for layer in run.layers.values():
        a, b = branch_matrices(layer)
        out += [a.numpy(), b.numpy()]
    return out + [t.float().numpy() for t in _heads(run).values()]


def write_adapter_file(run: TrainedRun, path: Path) -> dict[str, int]:
    """The run's adapter (and head) as an ONNX Runtime .onnx_adapter file; returns the rank per layer."""
    import onnxruntime as ort

    names = graphs.adapter_input_names(list(run.layers), list(_heads(run)))
    values = _swappable_values(run)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in zip(names, values)})
    fmt.export_adapter(str(path))
    return {n: l.rank for n, l in run.layers.items()}


def _calibration_rows(run: TrainedRun) -> list[list[int]]:
    """Token rows for calibrating quantisers: a seeded sample of the run's own training examples."""
    return [list(e["input_ids"]) for e in seeded_sample(run.data.train, CALIBRATION_EXAMPLES)]


def _build_graph(run: TrainedRun, fmt: str, folder: Path, example: dict, quant: WeightOnly) -> WeightOnly | None:
    """Write the format's graph into `folder`; for the weight-only formats, return the settings applied."""
    causal = run.task == "causal-lm"
    if fmt in ("swappable", "nf4-adapters"):
        _build_nf4_graph(run, fmt, folder, example, causal)
        return None
    # merged formats: traced with placeholders, then filled one layer at a time; this consumes run.model
    sources = streamed.insert_placeholders(run.model, causal)
    bits, options = streamed.bits_and_options(fmt, quant, run.task, sources)
    graph = folder / "model.onnx"
    checks = graphs.export_decoder_with_cache(run.model, folder, defer_checks=True) if causal else []
    if not causal:
        graphs.trace_logits_graph(run.model, graph, example)
    applied = streamed.fill_placeholders(graph, sources, bits, options)
    release_free_heap()
    for check in checks:
        check()
    if fmt == "merged-fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        write_graph(convert_float_to_float16(onnx.load(str(graph)), keep_io_types=True), graph)
    elif fmt == "merged-int8-dynamic":
        quantise_dynamic_int8(graph)
    elif quant.algo == "gptq" and fmt in ("merged-int4", "merged-int8"):  # calibrated on the whole graph
        applied = quantise_weights(graph, 4 if fmt == "merged-int4" else 8, quant, _calibration_rows(run), run.task)
    return applied


def _build_nf4_graph(run: TrainedRun, fmt: str, folder: Path, example: dict, causal: bool) -> None:
    """The formats that keep the exact NF4 bytes (MatMulBnb4), with the adapters as branches or graph inputs."""
    model = copy.deepcopy(run.model)
    if run.recipe.model.quantize != "nf4":
        raise UserError(f"{fmt} needs a run trained over an NF4 base" + ("; use merged-fp32" if fmt == "nf4-adapters" else ""))
    if fmt == "swappable":
        adapted = nf4_adapter_model(model, adapter_as_input=True)
        rank_one = [t for layer in run.layers.values() for t in (torch.randn(1, layer.in_features), torch.randn(layer.out_features, 1))]
        graphs.trace_logits_graph(model, folder / "model.onnx", example, adapted, rank_one, causal=causal, heads=_heads(run))
        write_adapter_file(run, folder / ADAPTER_FILE)
        return
    nf4_adapter_model(model)
    if causal:
        graphs.export_decoder_with_cache(model, folder)
    else:
        graphs.trace_logits_graph(model, folder / "model.onnx", example)


def _sizes(folder: Path) -> dict[str, int]:
    """Every file of the folder by its path in it (shared files and the format's own)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def export_run(
    run_dir: Path,
    out_dir: Path,
    fmt: str,
    overwrite: bool = False,
    prune_threshold: float = DEFAULT_THRESHOLD,
    quant: WeightOnly = WeightOnly(),
    parity_examples: int = 8,
    metric_examples: int = 500,
    log=print,
    genai_precision: str = "int4-mixed",
    web: bool = False,
    mobile: bool = False,
    genai_adapters: bool = False,
) -> dict:
    """Export a finished run in one format, check it, and return the summary; with `web`, write the folder's
    browser page (transformers.js) beside it."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    layout.check_destination(out_dir, fmt, run_dir, overwrite)  # before the work, not only after it
    quant.check(fmt)
    if genai_adapters and fmt != "genai":
        raise UserError("--genai-adapters applies to --format genai (for the ONNX formats, see --format swappable)")
    quant = _for_edge_runtimes(fmt, quant, web, mobile)
    started = time.time()
    run = load_trained(run_dir)
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    examples = heldout_examples(run, max(parity_examples, metric_examples))
    with tempfile.TemporaryDirectory(prefix="qelalora-reference-") as reference:
        set_tokenizer_aside(run, Path(reference) / "tokenizer")
        ref = parity.reference_outputs(run.model, run.task, examples[:parity_examples], pad, examples[:metric_examples],
                                       run.tokenizer.eos_token_id, Path(reference))
        info, result = _export_checked(run, run_dir, out_dir, fmt, ref, examples, pad, prune_threshold, quant,
                                       metric_examples, log, genai_precision, started, overwrite, mobile,
                                       genai_adapters)
    if web or (out_dir / PAGE).is_file():  # a page written before offers the precision added now too
        dtypes = write_page(out_dir, assets=web)
        log(f"wrote {out_dir / PAGE} (transformers.js; precisions {', '.join(dtypes)}): qelalora serve {out_dir}")
    own = sum(info["files"].get(n, 0) for n in (info["file"], info["file"] + "_data", info["file"] + ".data"))
    log(f"exported {fmt} to {out_dir / info['file']}: {fmt_mib(own, 2)} (the graph and its data); max |logit diff| "
        f"{result['max_abs_logit_diff']:.2e}; {result['metric']} {result['metric_onnx']:.4g} "
        f"(PyTorch {result['metric_pytorch']:.4g})"
        + (f"; greedy tokens equal: {result['greedy_tokens_equal']}" if "greedy_tokens_equal" in result else ""))
    if mobile:
        ort_file = info["mobile"]["file"]
        log(f"wrote {out_dir / ort_file} for ONNX Runtime Mobile: {fmt_mib(info['files'][ort_file], 2)}; "
            f"max |logit diff| {info['mobile']['parity']['max_abs_logit_diff']:.2e}; operators for a reduced build in "
            f"{out_dir / info['mobile']['operators']}")
    return info


def _for_edge_runtimes(fmt: str, quant: WeightOnly, web: bool, mobile: bool) -> WeightOnly:
    """The weight-only settings the runtimes asked for can run, checked before the work: ONNX Runtime's format
    has no type for a 4-bit table's zero points; onnxruntime-web's WASM build has no GatherBlockQuantized and its
    kernels take no int8 activations (a graph asking for them answers differently on the CPU than in the page:
    SmolLM2 int4's greedy tokens parted at the 8th)."""
    if mobile:
        mobile_format.check(fmt)
        if quant.embeddings and fmt == "merged-int4":
            raise UserError("--mobile: the ONNX Runtime format cannot hold a 4-bit embedding table (its zero points' "
                            "type); drop --int4-embeddings")
        if fmt == "merged-int4":
            quant = replace(quant, embeddings=False)
    if web:
        if not layout.GRAPHS.get(fmt, (None, None))[1]:
            raise UserError(f"--web: transformers.js does not run {fmt} graphs; export merged-int4, merged-int8 or merged-fp32")
        if quant.embeddings:
            raise UserError("--web keeps the embedding table in float: onnxruntime-web's WASM build has no "
                            "GatherBlockQuantized (drop --int4-embeddings)")
        quant = replace(quant, embeddings=False, accuracy_level=None)
        node_modules()  # its files at hand before the work
    return quant


def _export_checked(run, run_dir, out_dir, fmt, ref, examples, pad, prune_threshold, quant, metric_examples, log,
                    genai_precision, started, overwrite, mobile=False, genai_adapters=False) -> tuple[dict, dict]:
    """Prune, build the format in a temporary folder (in the Hub layout), check it against the reference, and put
    it in place (a new folder, or a precision added to the run's folder)."""
    pruned = prune_adapters(run.layers, prune_threshold)
    ranks = {n: l.rank for n, l in run.layers.items()}  # now: building a merged format consumes the layers
    log(f"pruned: total rank {sum(pruned.ranks_before.values())} -> {sum(pruned.ranks_after.values())}, "
        f"adapter weights {pruned.bytes_before / 1024:.1f} -> {pruned.bytes_after / 1024:.1f} KiB"
        + (f", layers removed: {len(pruned.removed_layers)}" if pruned.removed_layers else ""))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        applied, adapter = _build_folder(run, run_dir, fmt, tmp, _example_batch(examples, pad), quant, genai_precision,
                                         genai_adapters)
        shared = _shared_fields(run, run_dir, pad, ranks)
        entry = {
            "file": layout.graph_file(fmt),
            "adapter": adapter,
            **({"precision": genai_precision} if fmt == "genai" else {}),
            "prune": pruned.to_dict(),
            "weight_only": applied.to_dict(4 if fmt == "merged-int4" else 8) if applied else None,
        }
        orphans = unreferenced_files(tmp)
        if orphans:  # a data file no graph references would be copied to the device for nothing
            raise RuntimeError(f"export left data files that no graph references: {[p.name for p in orphans]}")
        write_json_atomic(tmp / SUMMARY, {**shared, "formats": {fmt: entry}})
        if fmt != "genai":
            layout.write_transformers_js_config(tmp, {fmt: entry})
        checked = f"genai-{genai_precision}" if fmt == "genai" else fmt
        result = parity.check(open_export(tmp, fmt=fmt), ref, checked, examples[:metric_examples])
        if mobile:  # the .ort file, checked as the ONNX graph was
            entry["mobile"] = mobile_format.convert(tmp / entry["file"])
            write_json_atomic(tmp / SUMMARY, {**shared, "formats": {fmt: entry}})
            entry["mobile"]["parity"] = parity.check(open_export(tmp, fmt=fmt, mobile=True), ref, fmt,
                                                     examples[:metric_examples])
        entry.update(parity=result, files=_sizes(tmp), seconds=round(time.time() - started, 1))
        write_json_atomic(tmp / SUMMARY, {**shared, "formats": {fmt: entry}})
        layout.publish(tmp, out_dir, fmt, run_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**shared, **entry, "format": fmt}, result


def _build_folder(run, run_dir, fmt, tmp, example, quant, genai_precision, genai_adapters):
    """The format's files in `tmp` (graph under onnx/, config and tokenizer; or GenAI's folder); returns the
    weight-only settings applied (or None) and the adapter file's path in the folder (or None)."""
    if fmt != "genai":
        applied = _build_graph(run, fmt, tmp, example, quant)
        move_graph(tmp / "model.onnx", tmp / layout.graph_file(fmt))
        if fmt == "swappable":
            (tmp / ADAPTER_FILE).replace(tmp / layout.GRAPH_DIR / ADAPTER_FILE)
        run.tokenizer.save_pretrained(tmp)
        _edge_config(run).to_json_file(tmp / "config.json", use_diff=False)  # every field, id2label included
        return applied, f"{layout.GRAPH_DIR}/{ADAPTER_FILE}" if fmt == "swappable" else None
    adapter, layers = None, None
    if genai_adapters:  # the run's adapter file first: building consumes the model
        if _heads(run):
            raise UserError("--genai-adapters: this run trained a head, which ONNX Runtime GenAI's adapters "
                            "cannot carry; export it merged (without --genai-adapters)")
        adapter = f"{genai.ADAPTER_DIR}/{run_dir.name}.onnx_adapter"
        (tmp / genai.ADAPTER_DIR).mkdir()
        write_adapter_file(run, tmp / adapter)
        layers = {n: (l.in_features, l.out_features) for n, l in run.layers.items()}
    genai.build(run, tmp, genai_precision, _edge_config(run), layers)
    return None, adapter


def _shared_fields(run, run_dir, pad, ranks) -> dict:
    """The summary's fields that every precision of the run shares."""
    return {
        "task": run.task,
        "base_model": _public(run.recipe.model.name),
        "num_labels": run.recipe.model.num_labels if run.task == "seq-cls" else None,
        "label_names": run.label_names,
        "eos_token_id": run.tokenizer.eos_token_id,
        "pad_token_id": pad,
        "data": _public_data(run.recipe.to_dict()["data"]),
        "ranks": ranks,
        "run": run_dir.name,
        "run_fingerprint": layout.run_fingerprint(run_dir),
    }


def _public(value):
    """A local path's last part (an exported folder names no place on the machine that wrote it); else as is."""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def _public_data(section: dict) -> dict:
    """The run's data section without local paths (`qelalora eval --data` points at the data where it is)."""
    out = {k: _public(v) for k, v in section.items()}
    if isinstance(section.get("splits"), dict):
        out["splits"] = {k: _public(v) for k, v in section["splits"].items()}
    return out


def _edge_config(run):
    """The model's config as loaders of the exported folder need it (optimum's ORTModel classes, transformers):
    without the training-time bitsandbytes block, with the task class as architecture and the label names."""
    config = copy.deepcopy(run.model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(run.model).__name__]
    config._name_or_path = _public(config._name_or_path)
    return config


def export_adapter_only(run_dir: Path, path: Path, overwrite: bool = False) -> dict[str, int]:
    """Write just a run's .onnx_adapter, for a swappable graph exported from another run on the same base."""
    if path.exists() and not overwrite:
        raise RunDirError(f"{path} already exists; pass --overwrite to replace it")
    run = load_trained(run_dir)
    prune_adapters(run.layers)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        ranks = write_adapter_file(run, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return ranks

