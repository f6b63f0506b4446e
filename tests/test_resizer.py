import pytest
import torch

from qelalora.method.allocator import RoundPlan
from qelalora.method.resizer import apply_plan, resize_layer
from qelalora.method.starts import NEW_TRIPLET_E, orthogonal_unit_rows
from qelalora.run.train.step import build_optimizer
from tests.helpers import plain_layer


def _trained(layers, optimizer_name="adamw", foreach=None, steps=3):
    params = [p for l in layers for p in l.adapter_params()]
    opt = build_optimizer(params, optimizer_name, lr=1e-2, foreach=foreach)
    x = torch.randn(6, layers[0].in_features)
    for _ in range(steps):
        loss = sum(l(x).pow(2).sum() for l in layers)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_prune_removes_exactly_the_chosen_triplets():
    layer = plain_layer(rank=5)
    a, e, b = (t.detach().clone() for t in layer.adapter_params())
    resize_layer(layer, [1, 3], 0, None, torch.Generator().manual_seed(0))
    keep = [0, 2, 4]
    assert layer.rank == 3
    assert torch.equal(layer.lora_A, a[keep]) and torch.equal(layer.lora_E, e[keep])
    assert torch.equal(layer.lora_B, b[:, keep])


def test_new_triplets_preserve_function_and_are_orthogonal():
    layer = plain_layer(d_in=32, d_out=24, rank=4)
    x = torch.randn(10, 32)
    before = layer(x).detach()
    resize_layer(layer, [], 3, None, torch.Generator().manual_seed(0))
    assert layer.rank == 7
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    assert torch.all(layer.lora_E[4:] == NEW_TRIPLET_E)
    new_a, new_b = layer.lora_A[4:].detach(), layer.lora_B[:, 4:].detach()
    torch.testing.assert_close(new_a @ layer.lora_A[:4].T.detach(), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(new_b.T @ layer.lora_B[:, :4].detach(), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(new_a @ new_a.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(new_b.T @ new_b, torch.eye(3), atol=1e-5, rtol=0)


def test_orthogonal_rows_fill_the_space_up_to_full_rank():
    existing = torch.randn(6, 8)
    rows = orthogonal_unit_rows(existing, 2, torch.Generator().manual_seed(0))
    full = torch.cat([existing, rows])
    assert torch.linalg.matrix_rank(full) == 8
    with pytest.raises(ValueError):
        orthogonal_unit_rows(existing, 3, torch.Generator())


def test_same_parameter_objects_and_score_buffers_resized():
    layer = plain_layer(rank=4)
    ids = [id(p) for p in layer.adapter_params()]
    layer.lora_A_ibar.copy_(torch.arange(4.0)[:, None].expand_as(layer.lora_A_ibar))
    resize_layer(layer, [0], 0, None, torch.Generator())
    resize_layer(layer, [], 2, None, torch.Generator())
    assert [id(p) for p in layer.adapter_params()] == ids
    for name in ("lora_A", "lora_E", "lora_B"):
        for buf in layer.score_buffers(name):
            assert buf.shape == getattr(layer, name).shape
    assert layer.lora_A_ibar[:, 0].tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_moments_of_survivors_are_kept_bit_for_bit(foreach):
    layers = [plain_layer(rank=5, seed=0), plain_layer(rank=3, seed=1), plain_layer(rank=4, seed=2)]
    opt = _trained(layers, foreach=foreach)
    snap = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for l in layers for p in l.adapter_params()}
    untouched = {id(p): {k: v for k, v in opt.state[p].items()} for p in layers[2].adapter_params()}
    plan = RoundPlan(prune={0: [0, 2]}, grow={1: 2})
    apply_plan(layers, plan, opt, torch.Generator().manual_seed(0))

    keep = [1, 3, 4]
    for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
        p = getattr(layers[0], name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], snap[id(p)][key].index_select(dim, torch.tensor(keep)))
        grown = getattr(layers[1], name)
        old = snap[id(grown)]
        st = opt.state[grown]
        survivors = slice(0, 3)
        new = slice(3, 5)
        idx = (survivors,) if dim == 0 else (slice(None), survivors)
        nidx = (new,) if dim == 0 else (slice(None), new)
        assert torch.equal(st["exp_avg"][idx], old["exp_avg"])
        assert torch.equal(st["exp_avg_sq"][idx], old["exp_avg_sq"])
        assert torch.all(st["exp_avg"][nidx] == 0)
        torch.testing.assert_close(st["exp_avg_sq"][nidx], torch.full_like(st["exp_avg_sq"][nidx], old["exp_avg_sq"].mean().item()))
        assert torch.equal(st["step"], old["step"])
    for p in layers[2].adapter_params():
        for key, value in opt.state[p].items():
            assert value is untouched[id(p)][key]
            assert torch.equal(value, snap[id(p)][key])
    # training goes on with the resized tensors
    x = torch.randn(6, 16)
    sum(l(x).pow(2).sum() for l in layers).backward()
    opt.step()


def test_eight_bit_adamw_state_is_resized():
    pytest.importorskip("bitsandbytes")
    layers = [plain_layer(d_in=64, d_out=48, rank=6, seed=0)]
    opt = _trained(layers, "adamw8bit")
    p = layers[0].lora_A
    import bitsandbytes.functional as F

    def dense(key, n):
        st = opt.state[p]
        return F.dequantize_blockwise(st[f"state{n}"], absmax=st[f"absmax{n}"], code=st[f"qmap{n}"], blocksize=256)

    m1 = dense("state1", 1)
    resize_layer(layers[0], [2], 0, opt, torch.Generator())
    assert opt.state[p]["state1"].shape == p.shape == (5, 64)
    assert opt.state[p]["absmax1"].numel() == (5 * 64 + 255) // 256
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(dense("state1", 1), m1[keep], atol=0.02 * m1.abs().max().item(), rtol=0)
    resize_layer(layers[0], [], 2, opt, torch.Generator())
    assert opt.state[p]["state2"].shape == (7, 64)
    x = torch.randn(6, 64)
    layers[0](x).pow(2).sum().backward()
    opt.step()
    assert torch.isfinite(p).all()
