import pytest
import torch
import torch.nn as nn

from qelalora.base.models import head_params, load_base_model, target_paths, wrap_linears
from qelalora.method.base_weight import dequantized_base_weight
from qelalora.method.layer import ElaLoRALinear

bnb = pytest.importorskip("bitsandbytes")


def _nf4_linear(d_in=64, d_out=32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    q = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return q.to("cpu"), dense


def test_nf4_forward_matches_formula():
    base, _ = _nf4_linear()
    layer = ElaLoRALinear(base, rank=5, alpha=10.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    assert base.weight.quant_state.nested, "double quantisation must be on"
    x = torch.randn(3, 7, 64)
    w0 = dequantized_base_weight(base)
    expected = x @ w0.T + base.bias + 2.0 * (x @ layer.lora_A.T * layer.lora_E) @ layer.lora_B.T
    assert layer.scaling == 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_plain_linear_forward_and_delta_weight():
    torch.manual_seed(1)
    base = nn.Linear(16, 8)
    layer = ElaLoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(5, 16)
    merged = x @ (base.weight + layer.delta_weight()).T + base.bias
    torch.testing.assert_close(layer(x), merged, atol=1e-6, rtol=0)


def test_initial_branch_is_zero_and_stddev_as_specified():
    torch.manual_seed(0)
    layer = ElaLoRALinear(nn.Linear(256, 256), rank=64, alpha=16.0)
    assert torch.all(layer.lora_E == 0)
    assert abs(layer.lora_A.std().item() - 0.02) < 0.001
    assert abs(layer.lora_B.std().item() - 0.02) < 0.001
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32


def test_backward_reaches_only_adapters_and_head(tiny_bert_dir):
    model, spec = load_base_model(tiny_bert_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    layers = wrap_linears(model, paths, rank=2, alpha=4.0)
    heads = head_params(model, spec)
    for layer in layers.values():
        assert isinstance(layer.base, bnb.nn.Linear4bit)
        layer.lora_E.data.fill_(0.5)
    ids = torch.randint(0, 128, (2, 6))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    adapter = {id(p) for l in layers.values() for p in l.adapter_params()}
    allowed = adapter | {id(p) for p in heads}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == allowed
    assert len(layers) == 2 * 6 and len(heads) == 4  # 6 targets per BERT block; pooler + classifier


def test_llama_targets_are_found_by_path(tiny_llama_dir):
    model, spec = load_base_model(tiny_llama_dir, quantize="nf4")
    paths = target_paths(model, spec, ["q", "down"])
    assert paths == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_rank_zero_layer_is_just_the_base():
    torch.manual_seed(2)
    base = nn.Linear(8, 8)
    layer = ElaLoRALinear(base, rank=2, alpha=4.0)
    from qelalora.method.resizer import resize_layer

    resize_layer(layer, [0, 1], 0, None, torch.Generator().manual_seed(0))
    assert layer.rank == 0 and layer.lora_A.shape == (0, 8) and layer.lora_B.shape == (8, 0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.orthogonality_penalty().item() == 0.0
