"""Starts, scaling, score layouts, regulariser forms, per-tensor learning rates and the reference preset."""

import math

import pytest
import torch
import torch.nn as nn

from qelalora.base.models import head_params, load_base_model, target_paths
from qelalora.method.base_weight import dequantized_base_weight
from qelalora.method.config import PRESETS, ElaLoRAConfig
from qelalora.method.importance import triplet_scores, update_importance
from qelalora.method.layer import ElaLoRALinear, measure_adapter_bytes
from qelalora.method.resizer import resize_layer
from qelalora.method.starts import LORA_ROW_NORM, apply_residual
from qelalora.run.recipe import load_recipe
from qelalora.run.train.step import prepare_training, train
from tests.helpers import cls_batches, hf_loss, lm_batches

bnb = pytest.importorskip("bitsandbytes")


def _layer(start, d_in=48, d_out=40, rank=6, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    return ElaLoRALinear(base, rank, alpha=12.0, generator=torch.Generator().manual_seed(seed), start=start, **kw)


@pytest.mark.parametrize("start", ["gaussian", "orthonormal", "lora"])
def test_function_preserving_starts_leave_the_output_unchanged(start):
    layer = _layer(start)
    x = torch.randn(5, 48)
    assert torch.equal(layer(x), layer.base(x))


def test_orthonormal_start():
    layer = _layer("orthonormal")
    eye = torch.eye(6)
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, eye, atol=1e-5, rtol=0)
    assert torch.all(layer.lora_E == 0)
    assert layer.orthogonality_penalty("plain").item() < 1e-5


def test_lora_start_and_its_new_triplets():
    layer = _layer("lora")
    assert torch.all(layer.lora_B == 0) and torch.all(layer.lora_E == 1)
    assert layer.lora_A.abs().max().item() <= 1 / math.sqrt(48)
    with torch.no_grad():  # let B move, as training would
        layer.lora_B.normal_()
    x = torch.randn(5, 48)
    before = layer(x)
    resize_layer(layer, [], 2, None, torch.Generator().manual_seed(1))
    assert layer.rank == 8
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)  # B = 0 for the new columns (rounding only)
    assert torch.all(layer.lora_B[:, 6:] == 0) and torch.all(layer.lora_E[6:] == 1)
    new_rows = layer.lora_A[6:]
    torch.testing.assert_close(new_rows.norm(dim=1), torch.full((2,), LORA_ROW_NORM), atol=1e-6, rtol=0)
    assert (layer.lora_A[:6] @ new_rows.T).abs().max().item() < 1e-5  # orthogonal to the kept rows


def test_sqrt_rank_scaling():
    assert _layer("gaussian", rank=4, scaling="sqrt-rank").scaling == 6.0  # 12 / sqrt(4)
    assert _layer("gaussian", rank=4).scaling == 3.0


def _nf4_linear(d_in=128, d_out=96, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    q = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return q.to("cpu"), dense


def test_residual_start_is_the_best_rank_r_fit_of_the_quantisation_error():
    base, dense = _nf4_linear()
    layer = ElaLoRALinear(base, 8, alpha=16.0, start="residual")
    share = apply_residual(layer, dense.weight.data)
    w, w0 = dense.weight.data, dequantized_base_weight(base)
    error_before = (w - w0).norm()
    error_after = (w - w0 - layer.delta_weight()).norm()
    s = torch.linalg.svdvals(w - w0)
    # Eckart-Young: what is left is exactly the tail of singular values
    torch.testing.assert_close(error_after, s[8:].pow(2).sum().sqrt(), atol=1e-5, rtol=1e-4)
    assert error_after < error_before and 0 < share < 1
    torch.testing.assert_close(torch.tensor(share), s[:8].pow(2).sum() / s.pow(2).sum(), atol=1e-5, rtol=1e-4)
    eye = torch.eye(8)
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, eye, atol=1e-5, rtol=0)
    x = torch.randn(4, 128)
    full, nf4_only = dense(x), base(x)
    assert (layer(x) - full).norm() < (nf4_only - full).norm()


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_residual_start_reads_the_checkpoint_and_moves_the_model_towards_full_precision(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    full, spec = load_base_model(model_dir, quantize="none")
    torch.manual_seed(0)
    model, _ = load_base_model(model_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    ids = torch.randint(4, 128, (3, 10))

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits

    ref, nf4 = logits(full), logits(model)
    cfg = ElaLoRAConfig(budget_mb=10, rank=32, init="residual")  # half the width: most of the error's energy
    state = prepare_training(model, paths, head_params(model, spec), cfg, 20, lr=1e-3, weights_from=model_dir)
    started = logits(model)
    assert (started - ref).norm() < 0.8 * (nf4 - ref).norm()
    for path, layer in state.layers.items():  # each layer's weight is closer to the checkpoint's own
        w = full.get_submodule(path).weight.detach()
        w0 = dequantized_base_weight(layer.base)
        assert (w - w0 - layer.delta_weight()).norm() < 0.8 * (w - w0).norm(), path


@pytest.mark.parametrize("score_state", ["element", "element-bf16", "triplet"])
def test_budget_is_exact_for_every_score_layout(score_state, tiny_llama_dir):
    torch.manual_seed(0)
    model, spec = load_base_model(tiny_llama_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    cfg = ElaLoRAConfig(budget_mb=0.2, t_init=4, t_final=6, delta=2, b0=6, score_state=score_state, init="lora")
    state = prepare_training(model, paths, head_params(model, spec), cfg, 40, lr=5e-3)
    seen = []

    def check(s, _loss):
        measured = measure_adapter_bytes(list(s.layers.values()), s.head_params, s.optimizer)
        assert measured == s.ranks.adapter_bytes() <= cfg.budget_bytes
        seen.append(measured)

    train(state, lm_batches(128), 40, hf_loss, check)
    layer = next(iter(state.layers.values()))
    ibar = layer.score_buffers("lora_A")[0]
    expected = {"element": (layer.lora_A.shape, torch.float32), "element-bf16": (layer.lora_A.shape, torch.bfloat16),
                "triplet": ((layer.rank,), torch.float32)}[score_state]
    assert (tuple(ibar.shape), ibar.dtype) == (tuple(expected[0]), expected[1])
    assert any(r.pruned for r in state.ranks.history) and len(seen) == 40


def test_triplet_scores_agree_with_element_scores_for_e_and_rank_a_b_sensibly():
    torch.manual_seed(0)
    element, triplet = _layer("orthonormal"), _layer("orthonormal", score_state="triplet")
    with torch.no_grad():
        for p in element.adapter_params():
            p.normal_()
        for p, q in zip(triplet.adapter_params(), element.adapter_params()):
            p.copy_(q)
    for _ in range(5):
        x = torch.randn(7, 48)
        for layer in (element, triplet):
            layer.zero_grad()
            layer(x).pow(2).sum().backward()
        for p, q in zip(triplet.adapter_params(), element.adapter_params()):
            assert torch.equal(p.grad, q.grad)
        update_importance([element])
        update_importance([triplet])
    torch.testing.assert_close(triplet.score_buffers("lora_E")[0], element.score_buffers("lora_E")[0])
    # the per-triplet sensitivity EMA is the mean of the per-element ones (the EMA is linear)
    torch.testing.assert_close(triplet.score_buffers("lora_A")[0], element.score_buffers("lora_A")[0].mean(dim=1))
    torch.testing.assert_close(triplet.score_buffers("lora_B")[0], element.score_buffers("lora_B")[0].mean(dim=0))
    assert triplet_scores(triplet).shape == (6,)


def test_regulariser_forms():
    layer = _layer("gaussian", rank=3)
    eye = torch.eye(3)
    a = layer.lora_A @ layer.lora_A.T - eye
    b = layer.lora_B.T @ layer.lora_B - eye
    plain = torch.linalg.matrix_norm(a) + torch.linalg.matrix_norm(b)
    squared = a.pow(2).sum() + b.pow(2).sum()
    torch.testing.assert_close(layer.orthogonality_penalty("plain"), plain)
    torch.testing.assert_close(layer.orthogonality_penalty("squared"), squared)
    torch.testing.assert_close(layer.orthogonality_penalty("rank-normalised"), squared / 3)
    cfg = ElaLoRAConfig(gamma=0.2, gamma_decay="linear")
    assert [cfg.gamma_at(s, 100) for s in (0, 50, 100)] == [0.2, 0.1, 0.0]
    assert ElaLoRAConfig(gamma=0.2, gamma_decay="none").gamma_at(99, 100) == 0.2


def test_learning_rate_multipliers_per_tensor_kind(tiny_bert_dir):
    torch.manual_seed(0)
    model, spec = load_base_model(tiny_bert_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    cfg = ElaLoRAConfig(budget_mb=0.3, t_init=3, t_final=3, delta=2, b0=4, lr_mult_E=8.0, lr_mult_B=2.0)
    state = prepare_training(model, paths, head_params(model, spec), cfg, 20, lr=1e-3, warmup_steps=4)
    groups = state.optimizer.param_groups
    layers = list(state.layers.values())
    assert [g["params"] for g in groups[:3]] == [[l.lora_A for l in layers], [l.lora_E for l in layers], [l.lora_B for l in layers]]
    assert groups[3]["params"] == state.head_params
    train(state, cls_batches(128), 10, hf_loss)
    lrs = [g["lr"] for g in groups]
    assert lrs[1] == pytest.approx(8 * lrs[0]) and lrs[2] == pytest.approx(2 * lrs[0]) and lrs[3] == lrs[0]
    assert lrs[0] == pytest.approx(1e-3 * (20 - 10) / (20 - 4))  # the schedule drives every group alike
    assert any(r.pruned or r.grown for r in state.ranks.history)


def test_reference_preset_and_explicit_keys():
    recipe = load_recipe("minilm-l6-rotten-tomatoes", ["elalora.preset=reference"])
    for key, value in PRESETS["reference"].items():
        assert getattr(recipe.elalora, key) == value
    recipe = load_recipe("minilm-l6-rotten-tomatoes", ["elalora.preset=reference", "elalora.gamma=0.0"])
    assert recipe.elalora.gamma == 0.0 and recipe.elalora.init == "gaussian"


def test_bad_method_keys_are_reported(tmp_path):
    from qelalora.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["elalora.init=fancy", "elalora.score_state=int4", "elalora.lr_mult_E=0"])
    text = str(err.value)
    assert "elalora.init: one of gaussian, orthonormal, lora, residual" in text
    assert "elalora.score_state" in text and "elalora.lr_mult_E" in text
    with pytest.raises(RecipeError, match="needs model.quantize: nf4"):
        load_recipe(None, ["elalora.init=residual", "model.quantize=none"])


def test_trained_tensors_stay_fp32_when_the_base_computes_in_bf16(tiny_bert_dir):
    """The CUDA set-up (bf16 compute) checked on the CPU: heads upcast, adapters fp32, gradients fp32."""
    torch.manual_seed(0)
    model, spec = load_base_model(tiny_bert_dir, quantize="nf4", compute_dtype=torch.bfloat16)
    assert model.get_submodule("classifier").weight.dtype == torch.bfloat16  # as loaded
    paths = target_paths(model, spec, list(spec.targets))
    heads = head_params(model, spec)
    assert heads and all(p.dtype == torch.float32 for p in heads)
    state = prepare_training(model, paths, heads, ElaLoRAConfig(budget_mb=0.3, t_init=3, t_final=3, delta=2), 10, lr=1e-3)
    losses = train(state, cls_batches(128), 10, hf_loss)
    assert all(math.isfinite(x) for x in losses)
    trained = heads + [p for layer in state.layers.values() for p in layer.adapter_params()]
    hf_loss(model, next(cls_batches(128))).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert model.get_submodule("bert.encoder.layer.0.attention.self.query").base.compute_dtype == torch.bfloat16
