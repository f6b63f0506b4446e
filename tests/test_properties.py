"""Property tests: random shapes, scores, budgets and plans against the allocator's and resizer's promises."""

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qelalora.method.allocator import LayerView, plan_round
from qelalora.method.budget import LayerShape, StateCost, adapter_bytes, layer_bytes
from qelalora.method.layer import ElaLoRALinear
from qelalora.method.resizer import resize_layer

ADAMW = StateCost("adamw")


@st.composite
def layer_sets(draw):
    r_min = draw(st.integers(0, 2))
    n = draw(st.integers(1, 6))
    views = []
    for i in range(n):
        d_in, d_out = draw(st.integers(1, 48)), draw(st.integers(1, 48))
        top = min(d_in, d_out)
        rank = draw(st.one_of(st.just(0), st.integers(min(r_min, top), top)))
        scores = draw(st.lists(st.floats(0, 1e3, allow_nan=False, width=32), min_size=rank, max_size=rank))
        views.append(LayerView(LayerShape(f"l{i}", d_in, d_out), rank, torch.tensor(scores, dtype=torch.float32)))
    fixed = draw(st.integers(0, 10_000))
    before = adapter_bytes([v.shape for v in views], [v.rank for v in views], ADAMW, fixed)
    budget = before + draw(st.integers(0, 200_000))
    return views, r_min, fixed, budget


@settings(max_examples=400, deadline=None)
@given(layer_sets(), st.integers(1, 4), st.integers(0, 8), st.booleans())
def test_plan_keeps_every_promise(case, k, b, per_byte):
    views, r_min, fixed, budget = case
    ranks = [v.rank for v in views]
    plan = plan_round(views, b, k, r_min, budget, ADAMW, fixed, per_byte=per_byte)
    new = plan.new_ranks(ranks)
    assert plan.bytes_after <= budget
    assert plan.bytes_after == adapter_bytes([v.shape for v in views], new, ADAMW, fixed)
    assert not set(plan.prune) & set(plan.grow)
    pruned = sum(len(t) for t in plan.prune.values())
    assert pruned <= b and sum(plan.grow.values()) <= pruned
    if sum(plan.grow.values()) < pruned:  # a slot was left unused: then no layer could have taken one more
        for i, v in enumerate(views):
            if v.rank == 0 or i in plan.prune:
                continue
            extra = layer_bytes(v.shape.d_in, v.shape.d_out, new[i] + 1, ADAMW) - layer_bytes(v.shape.d_in, v.shape.d_out, new[i], ADAMW)
            assert plan.grow.get(i, 0) >= k or new[i] >= v.shape.max_rank or plan.bytes_after + extra > budget, i
    again = plan_round([LayerView(v.shape, v.rank, v.scores.clone()) for v in views], b, k, r_min, budget, ADAMW, fixed,
                       per_byte=per_byte)
    assert (again.prune, again.grow, again.bytes_after) == (plan.prune, plan.grow, plan.bytes_after)
    for i, v in enumerate(views):
        assert new[i] <= v.shape.max_rank
        assert plan.grow.get(i, 0) <= k
        removed = plan.prune.get(i, [])
        assert len(set(removed)) == len(removed) and all(0 <= t < v.rank for t in removed)
        if removed:
            assert new[i] >= r_min
        if v.rank == 0:
            assert i not in plan.grow and i not in plan.prune


@st.composite
def resize_cases(draw):
    d_in, d_out = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    rank = draw(st.integers(1, min(d_in, d_out)))
    grow = draw(st.booleans())
    if grow:
        return d_in, d_out, rank, [], draw(st.integers(1, min(d_in, d_out) - rank)) if rank < min(d_in, d_out) else 0
    removed = draw(st.lists(st.integers(0, rank - 1), unique=True, max_size=rank))
    return d_in, d_out, rank, sorted(removed), 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resize_cases(), st.integers(0, 2**31 - 1))
def test_resize_changes_output_by_exactly_the_removed_triplets(case, seed):
    d_in, d_out, rank, removed, n_new = case
    torch.manual_seed(seed)
    layer = ElaLoRALinear(nn.Linear(d_in, d_out), rank, alpha=4.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    opt = torch.optim.AdamW(layer.adapter_params(), lr=1e-2)
    x = torch.randn(5, d_in)
    layer(x).pow(2).sum().backward()
    opt.step()
    before_out = layer(x).detach()
    a, e, b = (p.detach().clone() for p in layer.adapter_params())
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in layer.adapter_params()}
    expected = before_out.clone()
    for t in removed:  # the removed triplets' contribution: s E_t (A_t x) B_t
        expected -= layer.scaling * e[t] * (x @ a[t])[:, None] * b[:, t][None, :]
    resize_layer(layer, removed, n_new, opt, torch.Generator().manual_seed(seed))
    keep = [t for t in range(rank) if t not in removed]
    torch.testing.assert_close(layer(x).detach(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.lora_A[: len(keep)], a[keep]) and torch.equal(layer.lora_E[: len(keep)], e[keep])
    assert torch.equal(layer.lora_B[:, : len(keep)], b[:, keep])
    for p, dim in zip(layer.adapter_params(), (0, 0, 1)):
        for key in ("exp_avg", "exp_avg_sq"):
            kept = opt.state[p][key].narrow(dim, 0, len(keep))
            assert torch.equal(kept, moments[id(p)][key].index_select(dim, torch.tensor(keep, dtype=torch.long)))
    assert layer.rank == rank - len(removed) + n_new
