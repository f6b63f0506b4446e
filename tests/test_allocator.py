import pytest
import torch

from qelalora.allocator import LayerView, Schedule, plan_round
from qelalora.budget import LayerShape, OptimizerCost, adapter_bytes, layer_bytes

ADAMW = OptimizerCost("adamw")
BIG = 10**12


def views(ranks, scores, widths=None):
    widths = widths or [(32, 32)] * len(ranks)
    return [
        LayerView(LayerShape(f"l{i}", d_in, d_out), r, torch.tensor(s, dtype=torch.float32))
        for i, (r, s, (d_in, d_out)) in enumerate(zip(ranks, scores, widths))
    ]


def test_schedule_rounds_and_cubic_decay():
    s = Schedule(total_steps=100, t_init=10, t_final=30, delta=10, b0=4)
    rounds = {t: s.round_size(t) for t in range(1, 101) if s.round_size(t) is not None}
    # p = (t - 10) / 60; b = round(4 (1 - p^3))
    assert rounds == {20: 4, 30: 4, 40: 4, 50: 3, 60: 2}
    assert s.updates_scores(69) and not s.updates_scores(70)


def test_schedule_rejects_no_adjustment_phase():
    with pytest.raises(ValueError, match="no adjustment phase"):
        Schedule(total_steps=10, t_init=5, t_final=5, delta=1, b0=1)


def test_prunes_exactly_b_lowest_and_grows_owners_of_highest():
    v = views([3, 3, 3], [[0.5, 0.1, 0.9], [0.2, 0.3, 0.8], [5.0, 6.0, 7.0]])
    # pools (k=2): l0 -> 0.1, 0.5; l1 -> 0.2, 0.3; l2 -> 5.0, 6.0
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert plan.prune == {0: [1], 1: [0]}
    assert plan.grow == {2: 2}
    assert plan.new_ranks([3, 3, 3]) == [2, 2, 5]


def test_ties_remove_exactly_b():
    v = views([4, 4, 4], [[1.0] * 4] * 3)
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert sum(len(t) for t in plan.prune.values()) == 2
    assert plan.prune == {0: [0, 1]}  # ties broken by (layer, triplet)


def test_no_layer_is_pruned_and_grown_in_one_round():
    # pool is small: the same layers own both the lowest and the highest entries
    v = views([2, 2], [[0.1, 9.0], [0.2, 8.0]])
    plan = plan_round(v, b=3, k=2, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert not set(plan.prune) & set(plan.grow)


def test_layer_at_r_min_is_not_pruned_but_can_grow():
    v = views([1, 3], [[5.0], [0.1, 0.2, 0.3]])
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert 0 not in plan.prune
    assert plan.prune == {1: [0]}
    assert plan.grow == {0: 1}


def test_r_min_zero_allows_leaving_the_model_and_rank_zero_never_returns():
    v = views([1, 0, 3], [[0.01], [], [1.0, 2.0, 3.0]])
    plan = plan_round(v, b=1, k=2, r_min=0, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert plan.prune == {0: [0]} and 1 not in plan.grow


def test_at_most_k_gains_and_max_rank():
    v = views([3, 3], [[0.0, 0.0, 0.0], [9.0, 8.0, 7.0]], widths=[(32, 32), (4, 32)])
    plan = plan_round(v, b=2, k=3, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert plan.grow == {1: 1}  # min(d_in, d_out) = 4 caps layer 1 at rank 4
    v = views([3, 4], [[0.0, 0.0, 0.0], [9.0, 8.0, 7.0, 6.0]])
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    assert plan.grow == {1: 2}


def test_growth_is_refused_past_the_byte_budget():
    widths = [(64, 64), (8, 8)]
    v = views([2, 2], [[0.1, 0.2], [5.0, 6.0]], widths=widths)
    shapes = [x.shape for x in v]
    before = adapter_bytes(shapes, [2, 2], ADAMW, 0)
    # prune one wide triplet, then allow room for exactly one narrow one
    budget = before - layer_bytes(64, 64, 2, ADAMW) + layer_bytes(64, 64, 1, ADAMW) + (
        layer_bytes(8, 8, 3, ADAMW) - layer_bytes(8, 8, 2, ADAMW)
    )
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=budget, opt=ADAMW, fixed_bytes=0)
    assert plan.grow == {1: 1} and plan.bytes_after == budget
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=budget - 1, opt=ADAMW, fixed_bytes=0)
    assert plan.grow == {} and plan.bytes_after <= budget - 1


def test_byte_budget_blocks_wide_growth_that_a_rank_count_budget_allows():
    widths = [(512, 512), (8, 8), (8, 8)]
    scores = [[7.0, 8.0], [0.1, 0.2], [0.3, 0.4]]
    budget = adapter_bytes([LayerShape("x", *w) for w in widths], [2, 2, 2], ADAMW, 0)
    by_bytes = plan_round(views([2, 2, 2], scores, widths), b=2, k=2, r_min=1, budget_bytes=budget, opt=ADAMW, fixed_bytes=0)
    assert by_bytes.prune == {1: [0], 2: [0]} and by_bytes.grow == {}  # two narrow triplets cannot pay for a wide one
    by_rank = plan_round(views([2, 2, 2], scores, widths), b=2, k=2, r_min=1, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0, max_total_rank=6)
    assert by_rank.new_ranks([2, 2, 2]) == [4, 1, 1]


def test_rank_count_cap_holds_when_fewer_than_b_are_prunable():
    # r_min = 2: l0 and l3 cannot be pruned, l1 and l2 only once each, so 2 prunes and 3 growths without the cap
    scores = [[7.0, 8.0], [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [9.0, 10.0]]
    ranks = [2, 3, 3, 2]
    kw = dict(b=3, k=2, r_min=2, budget_bytes=BIG, opt=ADAMW, fixed_bytes=0)
    free = plan_round(views(ranks, scores, [(16, 16)] * 4), **kw)
    capped = plan_round(views(ranks, scores, [(16, 16)] * 4), **kw, max_total_rank=10)
    assert free.new_ranks(ranks) == [3, 2, 2, 4]
    assert capped.new_ranks(ranks) == [2, 2, 2, 4]
