"""Adapter inputs in an ONNX Runtime GenAI graph, so that `og.Adapters` switches runs' adapters on one loaded base.

Each adapted projection's base MatMul gets a low-rank branch, y = W x + (x A^T) B^T, whose two matrices are graph
inputs with a symbolic rank of their own and a rank-0 default (the base alone when no adapter is active). The
inputs are named and laid out as the swappable format's (`lora_a.<layer>` [rank, in], `lora_b.<layer>` [out, rank],
B with its scale and E folded in), so one `.onnx_adapter` file (`export --adapter-only`) serves both, and
ElaLoRA's per-layer ranks need no padding. Only the graph's proto is rewritten; its weights file is left as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from qelalora.errors import UserError

from .graphs import ADAPTER_A, ADAPTER_B


def builder_prefix(layer: str) -> str:
    """The model builder's node-name prefix for a projection: 'model.layers.3.self_attn.q_proj' ->
    '/model/layers.3/attn/q_proj/'."""
    found = re.fullmatch(r"(?:.+\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)", layer)
    if found is None:
        raise UserError(f"--genai-adapters: no ONNX Runtime GenAI node for {layer} (attention and MLP projections of "
                        "the decoder layers only)")
    return f"/model/layers.{found[1]}/{'attn' if found[2] == 'self_attn' else 'mlp'}/{found[3]}/"


def add_adapter_inputs(graph: Path, layers: dict[str, tuple[int, int]]) -> None:
    """Give each layer in `layers` (name -> (in, out) features) its branch and inputs, in `graph` in place."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    nodes = list(model.graph.node)
    after: dict[int, list] = {}
    for name, (fan_in, fan_out) in layers.items():
        prefix = builder_prefix(name)
        found = [i for i, n in enumerate(nodes) if n.name.startswith(prefix) and n.op_type in ("MatMul", "MatMulNBits")]
        if len(found) != 1:
            raise UserError(f"--genai-adapters: expected one MatMul for {name} under {prefix}, found {len(found)}")
        base = nodes[found[0]]
        out, x = base.output[0], base.input[0]
        base.output[0] = f"{out}/base"
        a, b, tag = ADAPTER_A.format(name), ADAPTER_B.format(name), prefix + "lora"
        rank = f"rank.{name}"
        model.graph.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [rank, fan_in]),
                                  helper.make_tensor_value_info(b, TensorProto.FLOAT, [fan_out, rank])])
        model.graph.initializer.extend([numpy_helper.from_array(np.zeros((0, fan_in), np.float32), a),
                                        numpy_helper.from_array(np.zeros((fan_out, 0), np.float32), b)])
        after[found[0]] = [
            helper.make_node("Transpose", [a], [f"{tag}/A_t"], name=f"{tag}/TransposeA", perm=[1, 0]),
            helper.make_node("MatMul", [x, f"{tag}/A_t"], [f"{tag}/xA"], name=f"{tag}/MatMulA"),
            helper.make_node("Transpose", [b], [f"{tag}/B_t"], name=f"{tag}/TransposeB", perm=[1, 0]),
            helper.make_node("MatMul", [f"{tag}/xA", f"{tag}/B_t"], [f"{tag}/xAB"], name=f"{tag}/MatMulB"),
            helper.make_node("Add", [f"{out}/base", f"{tag}/xAB"], [out], name=f"{tag}/Add"),
        ]
    del model.graph.node[:]
    for i, node in enumerate(nodes):  # each branch right after its base MatMul: the order stays topological
        model.graph.node.append(node)
        model.graph.node.extend(after.get(i, []))
    partial = graph.with_name(f".{graph.name}.partial")
    onnx.save(model, str(partial))
    partial.replace(graph)
