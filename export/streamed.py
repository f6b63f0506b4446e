"""Merged graphs built one layer at a time, so an export never holds the model in fp32.

Tracing a merged model needs every weight in fp32 at once (a 1B model's 4 GiB,
then copies of it in the exporter and the quantiser). Here the graph is traced
without its large weights instead: every linear (adapted, NF4 or the output
projection) and the input embedding table become placeholder nodes that carry
only their shapes. Then each placeholder is replaced in graph order by the
format's nodes: the layer's merged weight (dequantised NF4 + s B diag(E) A) is
made, written to the graph's data file in fp32 or quantised (`weight_nodes`),
and the layer's tensors are let go. The peak is the NF4 model plus one
layer's weights.

The weights are appended to the graph's data file as they are made; a graph
whose weights fit `graph_files.INLINE_LIMIT` is written as one file at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from qelalora.base.footprint import release_free_heap
from qelalora.errors import UserError
from qelalora.method.base_weight import dequantized_base_weight
from qelalora.method.layer import ElaLoRALinear

from .graph_files import write_graph
from .quantise import WeightOnly
from .weight_nodes import DataFile, WeightNodes

DOMAIN = "qelalora.placeholder"


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
    head: bool = False  # the output projection (a decoder's LM head)
    merge: bool = True  # False: the dequantised base alone (the adapter travels separately)

    def weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 weight [out, in] or table [rows, dim], bias or None): the adapter merged in where there is one
        (unless `merge` is off)."""
        module = self.module
        with torch.no_grad():
            if self.kind == "embedding":
                return module.weight.detach().float(), None
            base = module.base if isinstance(module, ElaLoRALinear) else module
            weight = dequantized_base_weight(base)
            if self.merge and isinstance(module, ElaLoRALinear) and module.rank > 0:
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
            sources.append(Source(name, module, "linear", head=module is output))
            replacement = _Linear(index, module.out_features)
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


def fill_placeholders(path: Path, sources: list[Source], bits: int | None, options: WeightOnly | None) -> WeightOnly | None:
    """Replace every placeholder node of the graph at `path` by the format's nodes (fp32 when `bits` is None),
    one source at a time, and write the graph back (its weights external above `INLINE_LIMIT`). Returns the
    weight-only settings applied (the task's defaults filled in), or None for fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        model = onnx.load(str(path))  # a traced graph over 2 GB (placeholders keep it small, but never assume)
    data = DataFile(path.with_name(path.name + "_data"))
    weights = WeightNodes(options, data)
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
                chosen = None if bits is None else options.layer_bits(bits, source.head,
                                                                      bool(path_names(source.path) & set(options.int8_layers)))
                new, inits = weights.linear(name, node.input[0], node.output[0], weight, bias, chosen)
            del weight, bias
            for tensor in inits:
                data.externalise(tensor)
            model.graph.initializer.extend(inits)
            nodes.extend(new)
            release(sources, index, pending)
            release_free_heap()  # the quantiser's copies of this weight
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
