"""How a graph and its weights are saved: one file, or the graph and one external data file beside it.

ONNX's protobuf cannot exceed 2 GB, and a graph loaded whole costs its size in
memory, so a graph whose weights are over `INLINE_LIMIT` keeps them in one
data file named `<graph>_data` (optimum's convention: `model.onnx_data`),
referenced by the graph, which ONNX Runtime, optimum and ONNX Runtime GenAI
open as it is. A folder holds no data file that no graph references.
"""

from __future__ import annotations

from pathlib import Path

INLINE_LIMIT = 512 * 2**20  # graphs whose weights are larger keep them in one external data file
SMALL_TENSOR = 1024  # tensors under this many bytes stay inside the graph (onnx's own threshold)


def write_graph(model, path: Path, data_path: Path | None = None) -> None:
    """Save `model` at `path`: one file when its weights fit `INLINE_LIMIT`, else the graph and one data file
    (`<name>_data`) that it references; no other data file of this graph is left behind. A model whose large
    tensors are all in `data_path` already (as `fill_placeholders` writes them) keeps that file as it is."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    data_path = data_path or path.with_name(path.name + "_data")
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    size = sum(_external_length(t) for t in external) + sum(len(t.raw_data) for t in model.graph.initializer)
    mixed = any(_external_location(t) != data_path.name for t in external) or (
        size > INLINE_LIMIT and any(len(t.raw_data) >= SMALL_TENSOR for t in model.graph.initializer))
    if external and mixed:
        load_external_data_for_model(model, str(path.parent))  # into memory: the file is rewritten below
        external = []
    if external and size <= INLINE_LIMIT:
        _save_inline(model, path, data_path)
        data_path.unlink()
    elif external:  # every large tensor already in data_path
        onnx.save(model, str(path))
    elif size <= INLINE_LIMIT:
        onnx.save(model, str(path))
        data_path.unlink(missing_ok=True)
    else:
        data_path.unlink(missing_ok=True)
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_path.name, size_threshold=SMALL_TENSOR)


def _save_inline(model, path: Path, data_path: Path) -> None:
    """`model` as one file, its external tensors read back from `data_path` one at a time, so that the graph is
    never held twice (as a message and as its serialised bytes). The file is the graph without those tensors,
    then one small model message per tensor holding just that initializer: protobuf parsers merge a message
    field that appears more than once and append its repeated fields, so every reader sees the whole graph."""
    import onnx

    inline = onnx.ModelProto()
    inline.CopyFrom(model)
    del inline.graph.initializer[:]
    inline.graph.initializer.extend(t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as out, data_path.open("rb") as data:
        out.write(inline.SerializeToString())
        del inline
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            piece = onnx.ModelProto()
            held = piece.graph.initializer.add()
            held.CopyFrom(tensor)
            del held.external_data[:]
            held.data_location = onnx.TensorProto.DEFAULT
            data.seek(_external_offset(tensor))
            held.raw_data = data.read(_external_length(tensor))
            out.write(piece.SerializeToString())
    partial.replace(path)


def _external_offset(tensor) -> int:
    return int(next((e.value for e in tensor.external_data if e.key == "offset"), 0))


def _external_length(tensor) -> int:
    return int(next(e.value for e in tensor.external_data if e.key == "length"))


def _external_location(tensor) -> str:
    return next(e.value for e in tensor.external_data if e.key == "location")


def referenced_files(graph: Path) -> set[Path]:
    """The graph file and every external data file its tensors name."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    proto = onnx.load(str(graph), load_external_data=False)
    found = {graph}
    for tensor in _get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                found.add(graph.parent / entry.value)
    return found


def unreferenced_files(folder: Path) -> list[Path]:
    """Model data files in `folder` that no graph in it references."""
    referenced = set().union(*(referenced_files(g) for g in folder.rglob("*.onnx")))
    data = [p for p in folder.rglob("*") if p.is_file() and (p.name.endswith((".onnx_data", ".onnx.data", ".data")))]
    return sorted(p for p in data if p not in referenced)


def move_graph(src: Path, dst: Path) -> None:
    """Move a graph to `dst`, its data file (if any) to `<dst>_data`, and point the graph's tensors at the new
    data file's name. Only the graph's proto is rewritten (without its weights); the data file is renamed."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.with_name(src.name + "_data")
    if not data.is_file():
        src.replace(dst)
        return
    proto = onnx.load(str(src), load_external_data=False)
    new_data = dst.with_name(dst.name + "_data")
    for tensor in _get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = new_data.name
    partial = dst.with_name(f".{dst.name}.partial")
    onnx.save(proto, str(partial))
    data.replace(new_data)
    partial.replace(dst)
    src.unlink()
