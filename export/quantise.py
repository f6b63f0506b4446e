"""Weight-only quantisation of a merged graph with ONNX Runtime's own quantisers.

`MatMulNBitsQuantizer` turns each MatMul with a constant weight into a
`MatMulNBits` node (4 or 8 bits, block-wise scales and zero points). Its
algorithms: `rtn` (round to nearest), `hqq` (half-quadratic, no data),
`k-quant` (llama.cpp-style search of scales) and `gptq` (error-compensating,
from calibration batches: here, the run's own training examples).
`accuracy_level` picks the CPU kernels' compute type (4 = int8 activations,
the fastest; None = ONNX Runtime's default). Dynamic int8 (per-tensor
activation scales, `quantize_dynamic`) stays available by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qelalora.errors import UserError

from .graph_files import write_graph
from .runtime import empty_past

INT4_ALGOS = ("rtn", "hqq", "k-quant", "gptq")
HEADS = ("same", "int8", "float")  # the output projection: quantised like the rest, 8-bit (RTN), or left in float
CALIBRATION_EXAMPLES = 16
# merged-int4's layers kept at 8 bits on decoders, with the output projection at 8 bits and the embedding table
# at 4: the kinds that 4 bits hurt most, measured one at a time on SmolLM2 (BENCHMARKS.md, "A mixed int4 file";
# test perplexity 1.517x -> 1.085x PyTorch NF4's at 0.23x the fp32 file)
DECODER_INT8_LAYERS = ("v_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class WeightOnly:
    """How `merged-int4` / `merged-int8` quantise: algorithm, block size, zero points, CPU compute type, and
    which layers a 4-bit file keeps at 8 bits. A field left None takes the task's measured default (`for_task`)."""

    algo: str = "rtn"
    block_size: int = 32
    symmetric: bool = False  # symmetric int4 wrecked SmolLM2 (perplexity x50) where asymmetric cost +53%
    # 4: int8 activations in the CPU kernels; on SmolLM2 it halved int4 decode time at +0.6% perplexity and kept
    # MiniLM within 0.25 points (BENCHMARKS.md). None: ONNX Runtime's default (fp32 compute).
    accuracy_level: int | None = 4
    head: str | None = None  # the output projection (LM head / classifier): one of HEADS
    # int4 RTN: the embedding table's Gather becomes a 4-bit GatherBlockQuantized (SmolLM2: file 191.5 -> 100.8 MiB,
    # perplexity +1.1%); merged-int8 keeps its table at 8 bits (GatherBlockQuantized, bits=8) unless this is False
    embeddings: bool | None = None
    # int4 only: layers kept at 8 bits (RTN), by name as it appears in the graph's node paths ("down_proj",
    # "v_proj", "lm_head"; BERT: "value", "output"): a mixed file, for the layers int4 hurts most
    int8_layers: tuple[str, ...] | None = None

    def for_task(self, task: str, bits: int) -> WeightOnly:
        """The settings with the defaults filled in. Decoders at 4 bits (not GPTQ, which quantises every MatMul
        whatever is excluded): DECODER_INT8_LAYERS and the output projection at 8 bits; encoders: every MatMul
        at 4 bits. The embedding table at 4 bits with RTN for both (MiniLM on validation: 83.0% with it, 82.6%
        with a float table, 3.5x smaller; BENCHMARKS.md)."""
        mixed = bits == 4 and task == "causal-lm" and self.algo != "gptq"
        return replace(
            self,
            head=self.head or ("int8" if mixed else "same"),
            embeddings=(bits == 4 and self.algo == "rtn") if self.embeddings is None else self.embeddings,
            int8_layers=(DECODER_INT8_LAYERS if mixed else ()) if self.int8_layers is None else self.int8_layers,
        )

    def layer_bits(self, bits: int, head: bool, named: bool) -> int | None:
        """One layer's bits (None: float): the output projection by the `head` rule, a layer among
        `int8_layers` at 8, the rest at `bits`."""
        if head and self.head not in (None, "same"):
            return None if self.head == "float" else 8
        return 8 if named else bits

    def check(self, fmt: str) -> None:
        """Stop with a clear error when these settings cannot apply to `fmt` (before any slow work)."""
        if self.algo not in INT4_ALGOS:
            raise UserError(f"--int4-algo: one of {', '.join(INT4_ALGOS)}, got {self.algo!r}")
        if self.head is not None and self.head not in HEADS:
            raise UserError(f"--head: one of {', '.join(HEADS)}, got {self.head!r}")
        if fmt == "merged-int8" and self.algo != "rtn":
            raise UserError("merged-int8 is round-to-nearest only; --int4-algo applies to merged-int4")
        if self.head not in (None, "same") and self.algo == "gptq":
            # measured on SmolLM2: with gptq the excluded head came out 4-bit all the same (same file, same perplexity)
            raise UserError("--head int8/float works with rtn, hqq and k-quant; ONNX Runtime's GPTQ path quantises "
                            "every MatMul whatever is excluded")
        if self.embeddings and (fmt != "merged-int4" or self.algo != "rtn"):
            raise UserError("--int4-embeddings applies to merged-int4 with --int4-algo rtn (ONNX Runtime quantises a "
                            "Gather to 4 bits only with round-to-nearest; merged-int8 always keeps its table at 8 bits)")
        if self.int8_layers and (fmt != "merged-int4" or self.algo == "gptq"):
            raise UserError("--int8-layers applies to merged-int4 with --int4-algo rtn, hqq or k-quant (ONNX Runtime's "
                            "GPTQ path quantises every MatMul whatever is excluded)")

    def to_dict(self, bits: int) -> dict:
        return {"bits": bits, "algo": self.algo, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "head": self.head, "embeddings": bool(self.embeddings),
                "int8_layers": list(self.int8_layers or ()) if bits == 4 else []}


class _QuietRootLogger:
    """ONNX Runtime's quantisers log every tensor at INFO on the root logger."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def calibration_feeds(model_path: Path, rows: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """One batch-1 feed per token row, with whatever else the graph takes (mask, positions, an empty KV cache)."""
    import onnxruntime as ort

    inputs = {i.name: i for i in ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs()}
    feeds = []
    for row in rows:
        ids = np.array([row], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None],
                **empty_past(inputs, 1)}
        feeds.append({k: v for k, v in feed.items() if k in inputs})
    return feeds


def output_projection(model) -> str | None:
    """The MatMul (or Gemm) that makes the graph's `logits` (through a bias Add, if any): the LM head or
    classifier. Encoders' classifiers are usually a Gemm, which the weight-only quantiser leaves alone anyway."""
    producer = {out: node for node in model.graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None and node.op_type in ("Add", "Cast", "Identity", "Reshape"):
        node = next((producer[i] for i in node.input if i in producer), None)
    return node.name if node is not None and node.op_type in ("MatMul", "Gemm") else None


def named_matmuls(model, names: tuple[str, ...]) -> dict[str, list[str]]:
    """For each name, the MatMul nodes whose path ("/model/layers.3/mlp/down_proj/MatMul") has it as a component."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            parts = set(node.name.split("/")) | set(node.name.replace(".", "/").split("/"))
            for name in parts & found.keys():
                found[name].append(node.name)
    return found


def quantise_weights(path: Path, bits: int, options: WeightOnly, calibration_rows: list[list[int]] | None = None,
                     task: str = "seq-cls") -> WeightOnly:
    """Replace `path` (an ONNX model) by its weight-only quantised version; return the settings applied (the
    task's defaults filled in, and of the default 8-bit layers those this graph has)."""
    options.check("merged-int4" if bits == 4 else "merged-int8")
    given = options.int8_layers is not None
    options = options.for_task(task, bits)
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # the embedding table's Gather too, when asked: its rows (axis 1) are what a lookup reads
    ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))} if options.embeddings else {}
    config = _algo_config(options, bits, ops, path, calibration_rows)
    model = onnx.load(str(path))
    head = output_projection(model) if options.head != "same" else None
    found = named_matmuls(model, options.int8_layers)
    eight = [node for nodes in found.values() for node in nodes]
    if given and options.int8_layers and not eight:
        raise UserError(f"--int8-layers {','.join(options.int8_layers)} names no MatMul of this graph; use the "
                        "names in its node paths, e.g. down_proj, v_proj, lm_head (BERT: value, output)")
    if not given:  # the task's default names: keep those this architecture has
        options = replace(options, int8_layers=tuple(name for name, nodes in found.items() if nodes))
    excluded = [n for n in [head, *eight] if n]
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=bits, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, algo_config=config, nodes_to_exclude=excluded or None, **ops,
    )
    with _QuietRootLogger():
        quantizer.process()
        model = quantizer.model.model
        if (eight or (head and options.head == "int8")) and bits < 8:
            # second pass at 8 bits over what the first left: the named layers, and the head unless it stays float
            keep_float = [head] if head and options.head == "float" else None
            config8 = nbits.DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric,
                                                         accuracy_level=options.accuracy_level, bits=8)
            quantizer = nbits.MatMulNBitsQuantizer(model, bits=8, block_size=options.block_size, is_symmetric=options.symmetric,
                                                   accuracy_level=options.accuracy_level, algo_config=config8,
                                                   nodes_to_exclude=keep_float)
            quantizer.process()
    write_graph(quantizer.model.model, path)
    return options


def _algo_config(options: WeightOnly, bits: int, ops: dict, path: Path, calibration_rows: list[list[int]] | None):
    """ONNX Runtime's settings for the chosen weight-only algorithm (gptq reads calibration feeds of `path`)."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if options.algo == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=bits)
    if options.algo == "k-quant":
        return nbits.KQuantWeightOnlyQuantConfig()
    if options.algo == "gptq":
        if not calibration_rows:
            raise ValueError("gptq needs calibration examples")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(calibration_feeds(path, calibration_rows))

            def get_next(self):
                return next(self.feeds, None)

        return nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=options.block_size)
    return nbits.DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric,
                                              accuracy_level=options.accuracy_level, bits=bits, **ops)


def quantise_dynamic_int8(path: Path) -> None:
    """int8 weights with activations quantised at run time (per-tensor scales): `merged-int8-dynamic`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    with _QuietRootLogger():
        quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, use_external_data_format=True)
    write_graph(onnx.load(str(tmp)), path)
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
