"""Merged graphs built one layer at a time, so an export never holds the model in fp32.

Tracing a merged model needs every weight in fp32 at once (a 1B model's 4 GiB,
then copies of it in the exporter and the quantiser). Here the graph is traced
without its large weights instead: every linear (adapted, NF4 or the output
projection) and the input embedding table become placeholder nodes that carry
only their shapes. Then each placeholder is replaced in graph order by the
format's nodes: the layer's merged weight (dequantised NF4 + s B diag(E) A) is
made, written to the graph's data file in fp32, or quantised by ONNX Runtime's
own quantiser (in column slices, which round-to-nearest, HQQ and k-quant treat
independently), and the layer's tensors are let go. The peak is the NF4 model
plus one layer's weights.

The weights are appended to the graph's data file as they are made; a graph
whose weights fit `graph_files.INLINE_LIMIT` is written as one file at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qelalora.errors import UserError
from qelalora.method.layer import ElaLoRALinear, dequantized_base_weight

from .graph_files import SMALL_TENSOR, write_graph
from .quantise import WeightOnly, _QuietRootLogger, named_matmuls, output_projection

DOMAIN = "qelalora.placeholder"
SLICE_BYTES = 64 * 2**20  # fp32 bytes of one weight slice handed to the quantiser at a time


class _LinearNode(torch.autograd.Function):
    """A placeholder for y = x W^T + b: zeros of the right shape in PyTorch, one node in the graph."""

    @staticmethod
    def forward(ctx, x, index, out_features):
        return x.new_zeros(*x.shape[:-1], out_features)

    @staticmethod
    def symbolic(g, x, index, out_features):
        y = g.op(f"{DOMAIN}::Linear", x, index_i=index)
        sizes = x.type().varyingSizes()
        if sizes is not None:
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [out_features]))
        return y


class _EmbeddingNode(torch.autograd.Function):
    """A placeholder for a lookup in an embedding table."""

    @staticmethod
    def forward(ctx, ids, index, dim):
        return torch.zeros(*ids.shape, dim, dtype=torch.float32)

    @staticmethod
    def symbolic(g, ids, index, dim):
        y = g.op(f"{DOMAIN}::Embedding", ids, index_i=index)
        sizes = ids.type().varyingSizes()
        if sizes is not None:
            y.setType(ids.type().with_dtype(torch.float32).with_sizes(list(sizes) + [dim]))
        return y


class _Linear(nn.Module):
    def __init__(self, index: int, out_features: int):
        super().__init__()
        self.index, self.out_features = index, out_features

    def forward(self, x):
        return _LinearNode.apply(x, self.index, self.out_features)


class _Embedding(nn.Module):
    """Keeps the multiplier of embeddings that scale their lookups (Gemma's `embed_scale`)."""

    def __init__(self, index: int, dim: int, scale: torch.Tensor | None):
        super().__init__()
        self.index, self.dim, self.scale = index, dim, scale

    def forward(self, ids):
        y = _EmbeddingNode.apply(ids, self.index, self.dim)
        return y if self.scale is None else y * self.scale.float()


@dataclass
class Source:
    """Where a placeholder's weights come from: the module it stands for, and its path in the model."""

    path: str
    module: nn.Module
    kind: str  # "linear" or "embedding"

    def weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 weight [out, in] or table [rows, dim], bias or None): the adapter merged in where there is one."""
        module = self.module
        with torch.no_grad():
            if self.kind == "embedding":
                return module.weight.detach().float(), None
            base = module.base if isinstance(module, ElaLoRALinear) else module
            weight = dequantized_base_weight(base)
            if isinstance(module, ElaLoRALinear) and module.rank > 0:
                weight = weight + module.delta_weight().detach()
            bias = None if base.bias is None else base.bias.detach().float()
        return weight, bias


def is_streamed_linear(module: nn.Module) -> bool:
    """An adapted or NF4 linear: a layer whose fp32 weight exists only while it is written."""
    import bitsandbytes as bnb

    return isinstance(module, (ElaLoRALinear, bnb.nn.Linear4bit))


def insert_placeholders(model: nn.Module, causal: bool) -> list[Source]:
    """In place: adapted and NF4 linears, a decoder's output projection and the input embedding table become
    placeholders; returns their sources by placeholder index. Other modules (norms, small heads) stay."""
    sources: list[Source] = []
    output = model.get_output_embeddings() if causal else None
    embedding = model.get_input_embeddings()
    chosen = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p, _ in chosen):
            continue  # the NF4 base inside an ElaLoRA layer goes with it
        if is_streamed_linear(module) or (output is not None and module is output):
            chosen.append((name, module))
        elif module is embedding:
            chosen.append((name, module))
    for name, module in chosen:
        index = len(sources)
        if module is embedding:
            sources.append(Source(name, module, "embedding"))
            replacement = _Embedding(index, module.embedding_dim, getattr(module, "embed_scale", None))
        else:
            sources.append(Source(name, module, "linear"))
            out = module.out_features
            replacement = _Linear(index, out)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, replacement)
    return sources


def release_tensors(module: nn.Module, keep: set[int]) -> None:
    """Empty every parameter and buffer of `module` whose storage is not in `keep` (data pointers)."""
    for sub in module.modules():
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if tensor.untyped_storage().data_ptr() not in keep:
                tensor.data = torch.empty(0, dtype=tensor.dtype)


def release(sources: list[Source], done: int, pending: set[int]) -> None:
    """Let go of source `done`'s tensors, except those a source still pending reads (a tied table)."""
    kept = {t.untyped_storage().data_ptr() for i in pending for t in sources[i].module.state_dict().values()}
    release_tensors(sources[done].module, kept)


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


class _Weights:
    """The format's nodes for one placeholder: fp32, or weight-only 4/8 bits through ONNX Runtime's quantiser."""

    def __init__(self, bits: int | None, options: WeightOnly | None, data: DataFile | None = None):
        self.bits, self.options, self.data = bits, options, data  # with `data`, large tensors go there in pieces

    def bits_for(self, source: Source, head: bool) -> int | None:
        """A layer's bits (None: fp32): the head's rule for the output projection, the 8-bit names, the rest."""
        if self.bits is None:
            return None
        o = self.options
        if head and o.head != "same":
            return None if o.head == "float" else 8
        return 8 if path_names(source.path) & set(o.int8_layers or ()) else self.bits

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


def fill_placeholders(path: Path, sources: list[Source], bits: int | None, options: WeightOnly | None) -> WeightOnly | None:
    """Replace every placeholder node of the graph at `path` by the format's nodes (fp32 when `bits` is None),
    one source at a time, and write the graph back (its weights external above `INLINE_LIMIT`). Returns the
    weight-only settings applied (the task's defaults filled in), or None for fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        model = onnx.load(str(path))  # a traced graph over 2 GB (placeholders keep it small, but never assume)
    head = next((i for i, s in enumerate(sources) if s.kind == "linear" and s.path.split(".")[-1] == "lm_head"), None)
    data = DataFile(path.with_name(path.name + "_data"))
    weights = _Weights(bits, options, data)
    nodes, pending = [], set(range(len(sources)))
    try:
        for tensor in model.graph.initializer:  # the traced graph's own (norms, position tables)
            data.externalise(tensor)
        for node in model.graph.node:
            if node.domain != DOMAIN:
                nodes.append(node)
                continue
            index = next(a.i for a in node.attribute if a.name == "index")
            if index not in pending:
                raise RuntimeError(f"{sources[index].path} is called twice in the traced graph; it cannot be streamed")
            pending.discard(index)
            source = sources[index]
            weight, bias = source.weight()
            name = "/" + source.path.replace(".", "/")
            if source.kind == "embedding":
                table_bits = None if bits is None or not options.embeddings else (4 if bits == 4 else 8)
                new, inits = weights.embedding(name, node.input[0], node.output[0], weight, table_bits)
            else:
                new, inits = weights.linear(name, node.input[0], node.output[0], weight, bias,
                                            weights.bits_for(source, index == head))
            del weight, bias
            for tensor in inits:
                data.externalise(tensor)
            model.graph.initializer.extend(inits)
            nodes.extend(new)
            release(sources, index, pending)
    finally:
        data.close()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    if bits is not None and not any(o.domain == "com.microsoft" for o in opsets):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    write_graph(model, path, data.path)
    return options


def path_names(path: str) -> set[str]:
    """The components of a module path ("model.layers.3.mlp.down_proj" -> model, layers, 3, mlp, down_proj)."""
    return set(path.split("."))


def bits_and_options(fmt: str, quant: WeightOnly, task: str, sources: list[Source]) -> tuple[int | None, WeightOnly | None]:
    """What `fill_placeholders` applies for a merged format: fp32, or weight-only bits with the task's defaults
    (of the default 8-bit layer names, those this model has; merged-int8's embedding table at 8 bits unless
    asked otherwise). A name given that matches no layer is an error."""
    if fmt in ("merged-fp32", "merged-fp16", "merged-int8-dynamic") or quant.algo == "gptq":
        return None, None
    bits = 4 if fmt == "merged-int4" else 8
    given = quant.int8_layers is not None
    options = quant.for_task(task, bits)
    if bits == 8 and quant.embeddings is None:
        options = replace(options, embeddings=True)
    names = set().union(*(path_names(s.path) for s in sources if s.kind == "linear"))
    found = tuple(n for n in options.int8_layers if n in names)
    if given and options.int8_layers and not found:
        raise UserError(f"--int8-layers {','.join(options.int8_layers)} names no MatMul of this graph; use the "
                        "names in its node paths, e.g. down_proj, v_proj, lm_head (BERT: value, output)")
    return bits, replace(options, int8_layers=found if not given else options.int8_layers)


def quantise_graph(path: Path, bits: int, options: WeightOnly) -> WeightOnly:
    """Weight-only quantisation of an existing graph's constant MatMuls (`quantise.quantise_weights`' rules:
    the named 8-bit layers and the head's rule), one weight at a time: each is read alone from the graph's data
    file, quantised in column slices, and written to the new data file; the rest is copied across. For graphs
    made by other tools (ONNX Runtime GenAI's builder) whose fp32 weights would not fit in memory twice."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(path), load_external_data=False)
    head = output_projection(model)
    eight = {n for nodes in named_matmuls(model, tuple(options.int8_layers or ())).values() for n in nodes}
    tensors = {t.name: t for t in model.graph.initializer}
    uses = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def loaded(tensor):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        return tensor

    new_data = path.with_name(path.name + "_data.partial")
    data = DataFile(new_data)
    weights = _Weights(bits, options, data)
    nodes, initializers = [], []
    try:
        for node in model.graph.node:
            weight = tensors.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
            if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
                nodes.append(node)
                continue
            chosen = None if node.name == head and options.head == "float" else (
                8 if node.name in eight or (node.name == head and options.head == "int8") else bits)
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
    return options
