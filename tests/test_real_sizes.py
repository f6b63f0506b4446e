"""Memory at real sizes, on tiny models: the exporter streams layer by layer, large graphs keep their weights
in one referenced data file, no export leaves a file nothing references, and loading reads one tensor at a time."""

import numpy as np
import onnx
import pytest
import torch

from qelalora.export import graph_files, streamed, weight_nodes
from qelalora.export.exporter import export_run
from qelalora.export.graph_files import referenced_files, unreferenced_files
from qelalora.export.layout import SUMMARY
from tests.test_export import bert_run, llama_run  # noqa: F401  (module fixtures: one trained run each)


def _model_files(folder):
    return {p for p in folder.rglob("*") if p.is_file() and (p.suffix == ".onnx" or "onnx_data" in p.name)}


@pytest.mark.parametrize("fmt", ["merged-fp32", "merged-int4", "merged-int8"])
def test_a_graph_over_the_inline_limit_keeps_its_weights_in_one_referenced_file(llama_run, tmp_path, monkeypatch, fmt):
    from optimum.onnxruntime import ORTModelForCausalLM

    monkeypatch.setattr(graph_files, "INLINE_LIMIT", 0)  # the >2 GB path, on a tiny model
    out = tmp_path / "out"
    info = export_run(llama_run, out, fmt, log=lambda *a: None)
    graph = out / info["file"]
    assert _model_files(out) == referenced_files(graph) == {graph, graph.with_name(graph.name + "_data")}
    assert not unreferenced_files(out)
    proto = onnx.load(str(graph), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) == 0 for t in external)
    on_disk = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert info["files"].keys() == on_disk.keys()
    assert {k: v for k, v in info["files"].items() if k != SUMMARY} == {k: v for k, v in on_disk.items() if k != SUMMARY}
    if fmt == "merged-fp32":  # parity held (export_run checks it); optimum opens the folder and generates
        assert info["parity"]["greedy_tokens_equal"]
        model = ORTModelForCausalLM.from_pretrained(out)  # finds onnx/model.onnx and its data file
        assert model.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("fmt", ["merged-fp16", "merged-int8-dynamic", "nf4-adapters"])
def test_no_export_leaves_a_file_that_nothing_references(arch, fmt, request, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_files, "INLINE_LIMIT", 0)
    out = tmp_path / "out"
    export_run(request.getfixturevalue(f"{arch}_run"), out, fmt, log=lambda *a: None)
    assert not unreferenced_files(out)
    assert _model_files(out) == set().union(*(referenced_files(g) for g in out.rglob("*.onnx")))


def test_the_traced_graph_holds_no_large_weight_and_each_layer_is_let_go(llama_run, tmp_path):
    """Placeholders carry shapes only: the traced graph is small, and filling it frees each layer's tensors."""
    from qelalora.export import graphs
    from qelalora.export.quantise import WeightOnly
    from qelalora.export.trained import load_trained

    run = load_trained(llama_run)
    sources = streamed.insert_placeholders(run.model, causal=True)
    kinds = [s.kind for s in sources]
    assert kinds.count("embedding") == 1 and sources[-1].path == "lm_head"
    assert len(sources) == 1 + len(run.layers) + 1  # the table, every adapted linear, the LM head
    checks = graphs.export_decoder_with_cache(run.model, tmp_path, defer_checks=True)
    traced = onnx.load(str(tmp_path / "model.onnx"))
    hidden = run.model.config.hidden_size
    assert max(np.prod(t.dims) for t in traced.graph.initializer) < 64 * hidden  # norms and rotary tables only
    assert sum(n.domain == streamed.DOMAIN for n in traced.graph.node) == len(sources)
    layers = list(run.layers.values())
    bits, options = streamed.bits_and_options("merged-int4", WeightOnly(), "causal-lm", sources)
    streamed.fill_placeholders(tmp_path / "model.onnx", sources, bits, options)
    for check in checks:
        check()
    assert all(layer.lora_A.numel() == 0 and layer.base.weight.numel() == 0 for layer in layers)
    filled = onnx.load(str(tmp_path / "model.onnx"))
    assert not [n for n in filled.graph.node if n.domain == streamed.DOMAIN]
    assert not any(o.domain == streamed.DOMAIN for o in filled.opset_import)


def test_merged_int8_keeps_its_table_at_8_bits(llama_run, tmp_path):
    info = export_run(llama_run, tmp_path / "out", "merged-int8", log=lambda *a: None)
    graph = onnx.load(str(tmp_path / "out" / info["file"])).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and next(a.i for a in gathers[0].attribute if a.name == "bits") == 8
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in {t.name for t in graph.initializer}
                and next(t for t in graph.initializer if t.name == n.input[0]).data_type == onnx.TensorProto.FLOAT]
    assert info["weight_only"]["embeddings"]
    assert info["parity"]["metric_onnx"] < 1.02 * info["parity"]["metric_pytorch"]


def test_column_slices_quantise_like_the_whole_matrix(monkeypatch):
    """The exporter hands ONNX Runtime's quantiser a weight in column slices: the bytes equal the whole's."""
    from qelalora.export.quantise import WeightOnly

    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    weights = weight_nodes.WeightNodes(WeightOnly().for_task("causal-lm", 4))
    whole = weights._matmul_nbits("w", "x", "y", weight, 4)
    monkeypatch.setattr(weight_nodes, "SLICE_BYTES", 4 * 64 * 7)  # 7 columns a slice: 6 slices, the last one short
    sliced = weights._matmul_nbits("w", "x", "y", weight, 4)
    assert [a for a in whole[0].attribute] == [a for a in sliced[0].attribute]
    for a, b in zip(whole[1], sliced[1]):
        assert a.name == b.name and list(a.dims) == list(b.dims) and a.raw_data == b.raw_data


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_loading_reads_one_tensor_at_a_time_and_gives_transformers_model(arch, request):
    """The loader's reads change nothing in the model: the same NF4 bytes, float tensors and fresh head as
    transformers' own reads, and no mapping of the checkpoint left behind."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    from qelalora.base.checkpoint_reads import checkpoint_mapped
    from qelalora.base.models import load_base_model

    folder = str(request.getfixturevalue(f"tiny_{arch}_dir"))
    torch.manual_seed(0)
    ours, spec = load_base_model(folder, "nf4", 2, "cpu")
    assert not checkpoint_mapped()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=list(spec.unquantized))
    torch.manual_seed(0)
    if arch == "llama":
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                      quantization_config=quant)
    else:
        theirs = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, ignore_mismatched_sizes=True,
                                                                    dtype=torch.float32, device_map={"": "cpu"},
                                                                    quantization_config=quant)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_an_inline_graph_is_written_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A graph under the inline limit whose weights are in its data file becomes one file without loading the data
    file whole: the graph, then one message per tensor, which readers merge into the same model."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(3)}
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}" if i < 2 else "y"]) for i in range(3)]
    small = numpy_helper.from_array(np.ones(4, np.float32), "unused_small")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 64])],
                              initializer=[numpy_helper.from_array(w, n) for n, w in weights.items()] + [small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "model.onnx"
    data = weight_nodes.DataFile(path.with_name("model.onnx_data"))
    for tensor in model.graph.initializer:
        data.externalise(tensor)
    data.close()
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer) == 3

    def whole(*args, **kwargs):
        raise AssertionError("the data file was loaded whole")

    monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model", whole)
    graph_files.write_graph(model, path, data.path)
    monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model", load_external_data_for_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert sorted(got) == sorted([*weights, "unused_small"])
    for name, value in weights.items():
        assert np.array_equal(got[name], value)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weights["w0"] @ weights["w1"] @ weights["w2"], rtol=1e-4, atol=1e-3)


def test_token_losses_in_slices_equal_the_whole_log_softmax():
    from qelalora.export.runtime import token_losses

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((37, 500)) * 5).astype(np.float32)
    labels = rng.integers(0, 500, 37)
    labels[[3, 20, 36]] = -100
    keep = labels != -100
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    want = -logp[np.arange(37)[keep], labels[keep]].sum()
    assert token_losses(logits, labels, positions=5) == pytest.approx(want, rel=1e-5)


def test_the_tokenizer_set_aside_writes_the_same_files(llama_run, tmp_path):
    from qelalora.export.trained import load_trained, set_tokenizer_aside

    run = load_trained(llama_run)
    run.tokenizer.save_pretrained(tmp_path / "direct")
    ids = run.tokenizer.pad_token_id, run.tokenizer.eos_token_id
    set_tokenizer_aside(run, tmp_path / "aside")
    assert "data" in vars(run)  # tokenised before the tokenizer went
    assert (run.tokenizer.pad_token_id, run.tokenizer.eos_token_id) == ids
    run.tokenizer.save_pretrained(tmp_path / "copy")
    direct = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert direct == sorted(p.name for p in (tmp_path / "copy").iterdir()) and "tokenizer.json" in direct
    for name in direct:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "copy" / name).read_bytes()
