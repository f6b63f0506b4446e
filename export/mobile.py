"""`--mobile`: the graph in ONNX Runtime's own format (`.ort`), for ONNX Runtime Mobile and other reduced builds.

ONNX Runtime's conversion tool applies the graph optimisations once, at export ("Fixed" style, for ARM: no x86-only
layout transforms), and writes the operator list a reduced build needs (`<graph>.required_operators.config`, the
input of ONNX Runtime's `--include_ops_by_config` build option). The `.ort` file sits beside the ONNX graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from qelalora.errors import UserError

from .graph_files import referenced_files

FORMATS = ("merged-fp32", "merged-fp16", "merged-int4", "merged-int8", "merged-int8-dynamic", "nf4-adapters")
ORT_LIMIT = 2 * 2**30  # an .ort file is one flatbuffer: no external data, under 2 GiB


def check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--mobile: {fmt} has no ONNX Runtime format conversion here; use one of {', '.join(FORMATS)}")


def convert(graph: Path) -> dict[str, str]:
    """Write `<graph>.ort` and `<graph>.required_operators.config` beside `graph`; returns their paths relative to
    the graph's folder's parent (the export folder)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    size = sum(p.stat().st_size for p in referenced_files(graph))
    if size >= ORT_LIMIT:
        raise UserError(f"--mobile: the graph's weights are {size / 2**30:.1f} GiB; an .ort file holds under 2 GiB "
                        "(export merged-int4 or merged-int8)")
    stem = graph.name.removesuffix(".onnx")
    with tempfile.TemporaryDirectory(prefix="qelalora-ort-", dir=graph.parent) as tmp:
        quiet = logging.getLogger("ort_format_model.utils")  # logs the temporary folder's path at INFO
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the tool prints each step
                convert_onnx_models_to_ort(graph, output_dir=Path(tmp), optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm")
        finally:
            quiet.setLevel(level)
        model, operators = Path(tmp) / f"{stem}.ort", Path(tmp) / f"{stem}.required_operators.config"
        if not model.is_file() or not operators.is_file():
            raise UserError(f"--mobile: ONNX Runtime's conversion wrote no {model.name}")
        # its header names the converted file by its temporary path: keep the name only
        lines = operators.read_text(encoding="utf-8").splitlines()
        operators.write_text("\n".join(f"# - {model.name}" if line.startswith("# - ") else line for line in lines) + "\n",
                             encoding="utf-8")
        model.replace(graph.with_name(model.name))
        operators.replace(graph.with_name(operators.name))
    folder = graph.parent.name
    return {"file": f"{folder}/{stem}.ort", "operators": f"{folder}/{stem}.required_operators.config"}
