"""Weight-only quantisation of a finished graph, one weight at a time.

For graphs made by other tools (ONNX Runtime GenAI's builder writes an fp32
graph) whose weights would not fit in memory twice, as `quantise.quantise_weights`
needs: each MatMul's constant weight is read alone from the graph's data file,
quantised (`weight_nodes`), and written to a new data file; the rest is copied
across one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .graph_files import write_graph
from .quantise import WeightOnly, named_matmuls, output_projection
from .weight_nodes import DataFile, WeightNodes


def quantise_graph(path: Path, bits: int, options: WeightOnly) -> WeightOnly:
    """Quantise the graph at `path` in place, with `quantise.quantise_weights`' rules (the named 8-bit layers,
    the output projection's rule, `bits` for the rest); returns the settings."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    head = output_projection(model)
    eight = {n for nodes in named_matmuls(model, tuple(options.int8_layers or ())).values() for n in nodes}
    tensors = {t.name: t for t in model.graph.initializer}
    uses = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    loaded = _loader(path.parent)
    new_data = path.with_name(path.name + "_data.partial")
    data = DataFile(new_data)
    weights = WeightNodes(options, data)
    nodes, initializers = [], []
    try:
        for node in model.graph.node:
            weight = tensors.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
            if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
                nodes.append(node)
                continue
            chosen = options.layer_bits(bits, node.name == head, node.name in eight)
            if chosen is None:
                nodes.append(node)
                continue
            matrix = torch.from_numpy(numpy_helper.to_array(loaded(weight))).t()  # [N, K], a view
            base = node.name.rsplit("/", 1)[0] if node.name else f"/matmul_{len(nodes)}"
            new, inits = weights.linear(base, node.input[0], node.output[0], matrix, None, chosen)
            del matrix
            uses[weight.name] -= 1
            if not uses[weight.name]:  # a table the lookup shares with a tied head stays for the lookup
                weight.ClearField("raw_data")
                tensors.pop(weight.name)
            for tensor in inits:
                data.externalise(tensor)
            initializers += inits
            nodes.extend(new)
        for tensor in tensors.values():  # everything else, copied across one tensor at a time
            data.externalise(loaded(tensor))
            initializers.append(tensor)
    finally:
        data.close()
    _replace_graph(model, nodes, initializers, path, new_data)
    return options


def _loader(folder: Path):
    """A function that reads a tensor's external data into it (the graph was loaded without its weights)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    def loaded(tensor):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        return tensor

    return loaded


def _replace_graph(model, nodes: list, initializers: list, path: Path, new_data: Path) -> None:
    """Write the quantised graph over the one at `path`, its weights in `<graph>_data` (from `new_data`)."""
    import onnx

    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    final = path.with_name(path.name + "_data")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = final.name
    new_data.replace(final)
    write_graph(model, path, final)
