"""One weight's nodes and bytes, made without copies of the whole weight in memory.

A linear becomes a MatMul over its fp32 weight, or ONNX Runtime's MatMulNBits
quantised by ONNX Runtime's own quantiser in column slices (which
round-to-nearest, HQQ and k-quant treat independently, so the slices' parts
join end to end); a table lookup becomes a Gather, or a GatherBlockQuantized
at 4 or 8 bits. Large tensors go to the graph's data file (`DataFile`) slice
by slice, as they are made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qelalora.errors import UserError

from .graph_files import SMALL_TENSOR
from .quantise import WeightOnly, _QuietRootLogger

SLICE_BYTES = 16 * 2**20  # fp32 bytes of one weight slice handed to the quantiser (which holds ~5 copies)


class DataFile:
    """The graph's external data: tensors appended as they are made, referenced by offset and length."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.file = path.open("wb")

    def externalise(self, tensor) -> None:
        """Move a TensorProto's bytes (raw_data) to the file, unless it is small."""
        from onnx import TensorProto, numpy_helper
        from onnx.external_data_helper import set_external_data

        if tensor.data_location == TensorProto.EXTERNAL:
            return  # written in pieces already (`pieces`)
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        data = tensor.raw_data
        if len(data) < SMALL_TENSOR:
            return
        start = self._align()
        self.file.write(data)
        set_external_data(tensor, self.path.name, offset=start, length=len(data))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        self.offset += len(data)

    def _align(self) -> int:
        pad = -self.offset % 4096  # aligned, so that a runtime may map it
        self.file.write(b"\0" * pad)
        self.offset += pad
        return self.offset

    def pieces(self, name: str, data_type: int, dims: list[int], chunks) -> object:
        """A tensor written as it is made, from an iterable of byte chunks (one slice of a weight at a time)."""
        from onnx import TensorProto
        from onnx.external_data_helper import set_external_data

        start = self._align()
        for chunk in chunks:
            self.file.write(chunk)
            self.offset += len(chunk)
        tensor = TensorProto(name=name, data_type=data_type, dims=dims, raw_data=b"\0")
        set_external_data(tensor, self.path.name, offset=start, length=self.offset - start)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    def close(self) -> None:
        self.file.close()


def _array(name: str, value: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(value), name)


class WeightNodes:
    """One weight's nodes: fp32, or weight-only 4/8 bits through ONNX Runtime's quantiser."""

    def __init__(self, options: WeightOnly | None, data: DataFile | None = None):
        self.options, self.data = options, data  # with `data`, large tensors go there in pieces

    def linear(self, name: str, x: str, y: str, weight: torch.Tensor, bias, bits: int | None):
        """Nodes and initializers for y = x W^T (+ b)."""
        from onnx import helper

        out = y if bias is None else f"{name}/MatMul_output"
        nodes, inits = [], []
        if bits is None:
            inits.append(_array(f"{name}.weight", weight.t().numpy()))
            nodes.append(helper.make_node("MatMul", [x, inits[-1].name], [out], name=f"{name}/MatMul"))
        else:
            node, tensors = self._matmul_nbits(name, x, out, weight, bits)
            nodes.append(node)
            inits += tensors
        if bias is not None:
            inits.append(_array(f"{name}.bias", bias.numpy()))
            nodes.append(helper.make_node("Add", [out, inits[-1].name], [y], name=f"{name}/Add"))
        return nodes, inits

    def _matmul_nbits(self, name: str, x: str, y: str, weight: torch.Tensor, bits: int):
        """ONNX Runtime's MatMulNBits of W, quantised in slices of output columns (B, scales and zero points are
        laid out one output column after another, so the slices' parts join end to end; B, the large one, goes
        to the data file slice by slice)."""
        from onnx import helper, numpy_helper

        n, k = weight.shape
        step = max(1, SLICE_BYTES // (4 * k))
        first: dict = {}
        small: dict[int, list[np.ndarray]] = {1: [], 2: []}

        def slices():
            for start in range(0, n, step):
                node, tensors = _quantise_slice(weight[start:start + step].t().contiguous().numpy(), bits, self.options)
                first.setdefault("node", node)
                first.setdefault("tensors", tensors)
                for i in range(2, len(node.input)):
                    small[i - 1].append(numpy_helper.to_array(tensors[node.input[i]]).reshape(-1))
                yield numpy_helper.to_array(tensors[node.input[1]]).tobytes()

        roles = ("B", "scales", "zero_points")
        if self.data is not None:
            b_tensor = self.data.pieces(f"{name}.B", 0, [], slices())
        else:
            b_tensor = None
            b_bytes = b"".join(slices())
        node, tensors = first["node"], first["tensors"]
        inputs, inits = [x], []
        for i in range(1, len(node.input)):
            proto = tensors[node.input[i]]
            shape = list(proto.dims)
            if i == 1:
                shape[0] = n
                if b_tensor is None:
                    b_tensor = helper.make_tensor(f"{name}.B", proto.data_type, shape, b_bytes, raw=True)
                else:
                    b_tensor.data_type = proto.data_type
                    b_tensor.dims.extend(shape)
                inits.append(b_tensor)
            else:
                joined = np.concatenate(small[i - 1])
                shape = [n, *shape[1:]] if len(shape) > 1 else [joined.size]
                inits.append(_array(f"{name}.{roles[i - 1]}", joined.reshape(shape)))
            inputs.append(inits[-1].name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs["N"] = n
        return helper.make_node("MatMulNBits", inputs, [y], name=f"{name}/MatMulNBits", domain="com.microsoft",
                                **attrs), inits

    def embedding(self, name: str, ids: str, y: str, table: torch.Tensor, bits: int | None):
        """A Gather over the table: fp32, or GatherBlockQuantized at 4 or 8 bits (blocks along each row)."""
        from onnx import TensorProto, helper

        if bits is None:
            inits = [_array(f"{name}.weight", table.numpy())]
            return [helper.make_node("Gather", [inits[0].name, ids], [y], name=f"{name}/Gather")], inits
        rows, dim = table.shape
        block = self.options.block_size
        if dim % block:
            raise UserError(f"the embedding width {dim} is not a multiple of the block size {block}")
        scales, zeros = [], []

        def slices():
            for q, s, z in _quantise_rows(table, bits, block):
                scales.append(s)
                zeros.append(z)
                yield q

        qtype = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
        data_name = f"{name}.weight_q{bits}"
        if self.data is not None:
            data = self.data.pieces(data_name, qtype, [rows, dim], slices())
        else:
            data = helper.make_tensor(data_name, qtype, [rows, dim], b"".join(slices()), raw=True)
        zero = helper.make_tensor(f"{name}.zero_points", qtype, [rows, dim // block], b"".join(zeros), raw=True)
        inits = [data, _array(f"{name}.scales", np.concatenate(scales)), zero]
        node = helper.make_node("GatherBlockQuantized", [data.name, ids, inits[1].name, zero.name], [y],
                                name=f"{name}/GatherBlockQuantized", domain="com.microsoft", gather_axis=0,
                                quantize_axis=1, block_size=block, bits=bits)
        return [node], inits


def _quantise_slice(weight_t: np.ndarray, bits: int, options: WeightOnly):
    """MatMulNBits of one [K, n] slice, by ONNX Runtime's quantiser on a one-node graph: (node, {name: tensor})."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    k = weight_t.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], "slice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight_t.shape[1]])],
        initializer=[_array("w", weight_t)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if options.algo == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=bits)
    elif options.algo == "k-quant":
        config = nbits.KQuantWeightOnlyQuantConfig()
    else:
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric,
                                                    accuracy_level=options.accuracy_level, bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=options.block_size,
                                           is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
                                           algo_config=config)
    with _QuietRootLogger():
        quantizer.process()
    out = quantizer.model.model.graph
    node = next(n for n in out.node if n.op_type == "MatMulNBits")
    return node, {t.name: t for t in out.initializer}


def _quantise_rows(table: torch.Tensor, bits: int, block: int):
    """Asymmetric round-to-nearest of each row in blocks (GatherBlockQuantized's layout), in row slices: yields
    (data bytes, scales [rows, blocks], zero-point bytes) per slice. 4 bits by ONNX Runtime's own routine;
    8 bits (which its quantiser does not offer for a Gather) by the same rule, scale = (max - min) / 255."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    rows, dim = table.shape
    step = max(2, SLICE_BYTES // (4 * dim)) // 2 * 2  # an even count: two 4-bit values share a byte
    for start in range(0, rows, step):
        part = table[start:start + step].numpy()
        if bits == 4:
            q, s, z = DefaultWeightOnlyQuantizer.quantize_ndarray(part, 1, block, False)
        else:
            blocks = part.reshape(part.shape[0], dim // block, block)
            low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
            s = ((high - low) / 255).astype(np.float32)
            s[s == 0] = 1.0
            z = np.clip(np.round(-low / s), 0, 255).astype(np.uint8)
            q = np.clip(np.round(blocks / s[..., None]) + z[..., None], 0, 255).astype(np.uint8).reshape(part.shape)
        yield np.asarray(q).tobytes(), np.asarray(s, dtype=np.float32).reshape(-1, dim // block), np.asarray(z).tobytes()
