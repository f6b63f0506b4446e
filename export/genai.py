"""`--format genai`: a folder that ONNX Runtime GenAI (`onnxruntime_genai`, `og.Model` / `og.Generator`) loads and
generates from, for decoders.

Built with that package's own model builder from the merged checkpoint (the
NF4 base dequantised with the adapters merged in, saved as a plain Hugging
Face folder), at fp32, fp16 or int4 (its MatMulNBits, int8 CPU compute), or
`int4-mixed` (the default): the builder's fp32 graph, quantised by qelalora
with merged-int4's decoder mix (attention input, FFN up/down and the LM head
at 8 bits, the rest at 4), which keeps SmolLM2's perplexity at 1.05x where
the builder's all-4-bit graph loses 1.6x (BENCHMARKS.md).
The folder is checked like the other formats (`parity`, through
`runtime.GenaiModel`): logits on held-out rows, the perplexity, greedy tokens.
The adapters are merged, or with `--genai-adapters` kept apart: the base is
built merged-free with an adapter input pair per adapted projection, each with
its own symbolic rank (`adapter_inputs`), and the run's adapter is an
`.onnx_adapter` file that `og.Adapters` loads and switches at run time. The package is
an optional extra (`pip install 'qelalora[genai]'`): its builder runs in a
child process, and its release line is pinned to one whose builder works with
the transformers that the ONNX exporter needs.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from qelalora.errors import UserError

from .adapter_inputs import add_adapter_inputs
from .graph_files import unreferenced_files
from .merged_checkpoint import write_merged_checkpoint
from .quantise import WeightOnly
from .requantise import quantise_graph

PRECISIONS = ("int4-mixed", "int4", "fp32", "fp16")
ADAPTER_DIR = "adapters"  # --genai-adapters: one .onnx_adapter per run, named after its run folder
# the builder fuses q/k/v into one qkv_proj MatMul; v_proj is kept for builders that do not
GENAI_INT8_LAYERS = ("qkv_proj", "v_proj", "up_proj", "down_proj")


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def _require() -> None:
    if not available():
        raise UserError("--format genai needs ONNX Runtime GenAI: pip install 'qelalora[genai]'")


def build(run, folder: Path, precision: str, config, adapter_layers: dict[str, tuple[int, int]] | None = None) -> None:
    """Merge the run's adapters into its base and let ONNX Runtime GenAI's builder write `folder`. With
    `adapter_layers` (name -> (in, out) features), the base stays merged-free and those layers get adapter inputs
    instead (`adapter_inputs`), for `og.Adapters` files."""
    _require()
    if run.task != "causal-lm":
        raise UserError("--format genai is for decoders (causal LMs); export encoders as merged-* or nf4-adapters")
    if precision not in PRECISIONS:
        raise UserError(f"--genai-precision: one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16":
        # built for the CPU (-e cpu), the fp16 graph stops at its second token (a buffer-reuse shape mismatch in
        # an inserted Cast; onnxruntime-genai issue 2009: the CPU provider has little fp16 support)
        raise UserError("--genai-precision fp16: ONNX Runtime GenAI's fp16 graph does not run on the CPU provider "
                        "(onnxruntime-genai issue 2009); use int4-mixed (the default), int4 or fp32")
    with tempfile.TemporaryDirectory(prefix="qelalora-genai-") as tmp:
        checkpoint, cache = Path(tmp) / "merged", Path(tmp) / "cache"
        # layer by layer; consumes run.model
        write_merged_checkpoint(run.model, checkpoint, config, merge=adapter_layers is None)
        run.tokenizer.save_pretrained(checkpoint)
        # with adapters: one MatMul per projection (the builder fuses q/k/v otherwise), each to take a branch
        extra = ["--extra_options", "disable_qkv_fusion=true"] if adapter_layers else []
        done = subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(folder),
             "-p", "fp32" if precision == "int4-mixed" else precision, "-e", "cpu", "-c", str(cache), *extra],
            capture_output=True, text=True,
        )
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"ONNX Runtime GenAI's builder could not build this model: {last[:400]}")
    if precision == "int4-mixed":
        graph = folder / "model.onnx"
        quantise_graph(graph, 4, WeightOnly(int8_layers=GENAI_INT8_LAYERS, head="int8", embeddings=False))
        for data in unreferenced_files(folder):  # the builder's fp32 weights (`model.onnx.data`), now requantised
            data.unlink()
    if adapter_layers:
        add_adapter_inputs(folder / "model.onnx", adapter_layers)
