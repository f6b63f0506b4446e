import pytest
import torch

from qelalora.method.allocator import LayerView, plan_round
from qelalora.method.budget import LayerShape, StateCost, adapter_bytes, layer_bytes
from qelalora.method.schedule import Schedule

ADAMW = StateCost("adamw")
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
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert plan.prune == {0: [1], 1: [0]}
    assert plan.grow == {2: 2}
    assert plan.new_ranks([3, 3, 3]) == [2, 2, 5]


def test_ties_remove_exactly_b():
    v = views([4, 4, 4], [[1.0] * 4] * 3)
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert sum(len(t) for t in plan.prune.values()) == 2
    assert plan.prune == {0: [0, 1]}  # ties broken by (layer, triplet)


def test_no_layer_is_pruned_and_grown_in_one_round():
    # pool is small: the same layers own both the lowest and the highest entries
    v = views([2, 2], [[0.1, 9.0], [0.2, 8.0]])
    plan = plan_round(v, b=3, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert not set(plan.prune) & set(plan.grow)


def test_layer_at_r_min_is_not_pruned_but_can_grow():
    v = views([1, 3], [[5.0], [0.1, 0.2, 0.3]])
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert 0 not in plan.prune
    assert plan.prune == {1: [0]}
    assert plan.grow == {0: 1}


def test_r_min_zero_allows_leaving_the_model_and_rank_zero_never_returns():
    v = views([1, 0, 3], [[0.01], [], [1.0, 2.0, 3.0]])
    plan = plan_round(v, b=1, k=2, r_min=0, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert plan.prune == {0: [0]} and 1 not in plan.grow


def test_at_most_k_gains_and_max_rank():
    v = views([3, 3], [[0.0, 0.0, 0.0], [9.0, 8.0, 7.0]], widths=[(32, 32), (4, 32)])
    plan = plan_round(v, b=2, k=3, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert plan.grow == {1: 1}  # min(d_in, d_out) = 4 caps layer 1 at rank 4
    v = views([3, 4], [[0.0, 0.0, 0.0], [9.0, 8.0, 7.0, 6.0]])
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
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
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=budget, cost=ADAMW, fixed_bytes=0)
    assert plan.grow == {1: 1} and plan.bytes_after == budget
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=budget - 1, cost=ADAMW, fixed_bytes=0)
    assert plan.grow == {} and plan.bytes_after <= budget - 1


def test_byte_budget_blocks_wide_growth_that_a_rank_count_budget_allows():
    widths = [(512, 512), (8, 8), (8, 8)]
    scores = [[7.0, 8.0], [0.1, 0.2], [0.3, 0.4]]
    budget = adapter_bytes([LayerShape("x", *w) for w in widths], [2, 2, 2], ADAMW, 0)
    by_bytes = plan_round(views([2, 2, 2], scores, widths), b=2, k=2, r_min=1, budget_bytes=budget, cost=ADAMW, fixed_bytes=0)
    # two narrow triplets cannot pay for a wide one, and nobody else can grow: the slots go back, nothing changes
    assert by_bytes.prune == {} and by_bytes.grow == {} and by_bytes.bytes_after == by_bytes.bytes_before
    by_rank = plan_round(views([2, 2, 2], scores, widths), b=2, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0, max_total_rank=6)
    assert by_rank.new_ranks([2, 2, 2]) == [4, 1, 1]


def test_fewer_prunable_than_b_grows_as_many_as_were_pruned():
    # r_min = 2: l0 and l3 cannot be pruned, l1 and l2 only once each: 2 prunes, so 2 growth slots
    scores = [[7.0, 8.0], [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [9.0, 10.0]]
    ranks = [2, 3, 3, 2]
    kw = dict(b=3, k=2, r_min=2, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    free = plan_round(views(ranks, scores, [(16, 16)] * 4), **kw)
    capped = plan_round(views(ranks, scores, [(16, 16)] * 4), **kw, max_total_rank=9)
    assert free.new_ranks(ranks) == [2, 2, 2, 4]  # l3 (strongest pool entries) takes both, k = 2
    assert capped.new_ranks(ranks) == [2, 2, 2, 3]


def test_a_slot_refused_by_a_pruned_owner_passes_to_the_next_candidate():
    # l0 owns both the weakest and the strongest pool entry: it is pruned, so its slot goes to l2, the next strongest
    v = views([3, 3, 3], [[0.01, 9.0, 9.5], [0.5, 0.6, 0.7], [0.8, 0.9, 1.0]])
    plan = plan_round(v, b=1, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert plan.prune == {0: [0]} and plan.grow == {2: 1}
    assert sum(plan.new_ranks([3, 3, 3])) == 9


def test_slots_go_beyond_the_pool_when_the_pool_cannot_take_them():
    # k = 2; l0 has one triplet (one pool entry) and l1, l2 are pruned: once the pool is spent, the second
    # slot still reaches l0, the only layer that can take it
    v = views([1, 3, 3], [[10.0], [0.1, 0.2, 0.3], [0.15, 0.25, 0.35]])
    plan = plan_round(v, b=2, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert plan.prune == {1: [0], 2: [0]}
    assert plan.grow == {0: 2}


def test_total_rank_is_kept_over_many_rounds_of_random_scores():
    # Equal widths, budget = the start's bytes: every freed slot can be taken, so total rank never drains
    g = torch.Generator().manual_seed(0)
    ranks = [4] * 12
    shapes = [(32, 32)] * 12
    budget = adapter_bytes([LayerShape("x", *w) for w in shapes], ranks, ADAMW, 0)
    for _ in range(200):
        scores = [torch.rand(r, generator=g).tolist() for r in ranks]
        plan = plan_round(views(ranks, scores, shapes), b=4, k=2, r_min=1, budget_bytes=budget, cost=ADAMW, fixed_bytes=0)
        ranks = plan.new_ranks(ranks)
        assert plan.bytes_after <= budget
    assert sum(ranks) == 48 and len(set(ranks)) > 1

def _plans_json(seed: int) -> str:
    """Plans for 50 random rounds, as JSON (run in a fresh process by the test below)."""
    import json

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(50):
        n = int(torch.randint(2, 9, (1,), generator=g))
        ranks = torch.randint(0, 6, (n,), generator=g).tolist()
        widths = [tuple(torch.randint(6, 40, (2,), generator=g).tolist()) for _ in range(n)]
        scores = [(torch.rand(r, generator=g) * 10).round().tolist() for r in ranks]  # rounded: many ties
        budget = adapter_bytes([LayerShape("x", *w) for w in widths], ranks, ADAMW, 0) + int(torch.randint(0, 20000, (1,), generator=g))
        plan = plan_round(views(ranks, scores, widths), b=3, k=2, r_min=1, budget_bytes=budget, cost=ADAMW, fixed_bytes=0)
        out.append([sorted(plan.prune.items()), sorted(plan.grow.items()), plan.bytes_after])
    return json.dumps(out)


def test_every_process_makes_the_same_plans():
    import os
    import subprocess
    import sys

    code = "from tests.test_allocator import _plans_json; print(_plans_json(7))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout
        for h in (1, 2, 3)
    }
    assert len(outputs) == 1 and outputs.pop().strip() == _plans_json(7)


@pytest.mark.parametrize("ranks", [[3, 3, 0], [4], [2, 2]])
def test_freed_slots_that_no_layer_can_take_go_back(ranks):
    """When every layer able to grow was pruned in the round (few layers, large b), the round keeps total rank."""
    scores = [[0.1 * (i + 1) + t for t in range(r)] for i, r in enumerate(ranks)]
    plan = plan_round(views(ranks, scores, [(16, 16)] * len(ranks)), b=4, k=2, r_min=0, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    assert sum(plan.new_ranks(ranks)) == sum(ranks)
    assert plan.bytes_after == plan.bytes_before


def test_per_byte_weighs_scores_by_what_a_triplet_costs():
    # l0 is 4x wider than l1 and l2 (4x the bytes per triplet); by score alone its weakest triplet (0.3) outranks
    # l1's (0.2), by score per byte it is the cheapest to lose (0.3 / 4 < 0.2)
    widths = [(128, 128), (32, 32), (32, 32)]
    scores = [[0.3, 2.0], [0.2, 1.0], [0.5, 0.6]]
    kw = dict(b=1, k=2, r_min=1, budget_bytes=BIG, cost=ADAMW, fixed_bytes=0)
    by_score = plan_round(views([2, 2, 2], scores, widths), **kw)
    assert by_score.prune == {1: [0]} and by_score.grow == {0: 1}  # l0's 2.0 is the strongest score
    per_byte = plan_round(views([2, 2, 2], scores, widths), **kw, per_byte=True)
    assert per_byte.prune == {0: [0]} and per_byte.grow == {1: 1}  # 1.0 per unit beats 2.0 / 4 and 0.6
    # the budget the start held is kept: the bytes of one wide triplet pay for one narrow one and leave some unspent
    budget = adapter_bytes([LayerShape("x", *w) for w in widths], [2, 2, 2], ADAMW, 0)
    tight = plan_round(views([2, 2, 2], scores, widths), **{**kw, "budget_bytes": budget}, per_byte=True)
    assert tight.new_ranks([2, 2, 2]) == [1, 3, 2] and tight.bytes_after <= budget


@pytest.mark.parametrize("opt", [ADAMW, StateCost("adamw8bit")])
def test_per_byte_is_the_score_order_when_layers_are_alike(opt):
    # alike layers at different ranks: the 8-bit optimiser's block rounding must not tip the order
    v = lambda: views([8, 9, 3], [[0.5, 0.1] + [0.9] * 6, [0.1, 0.3] + [0.8] * 7, [5.0, 6.0, 7.0]])  # noqa: E731
    a = plan_round(v(), b=1, k=2, r_min=1, budget_bytes=BIG, cost=opt, fixed_bytes=0)
    b = plan_round(v(), b=1, k=2, r_min=1, budget_bytes=BIG, cost=opt, fixed_bytes=0, per_byte=True)
    assert a.prune == {0: [1]} and a.grow == {2: 1}  # the tie between l0 and l1 goes to the lower layer index
    assert (a.prune, a.grow) == (b.prune, b.grow)
