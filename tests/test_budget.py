import pytest

from qelalora.method.budget import BudgetError, LayerShape, StateCost, layer_bytes, plan_initial_rank

ADAMW = StateCost("adamw")


def test_triplet_cost_matches_spec_formula_for_adamw():
    # (d_in + d_out + 1) * 24 bytes per triplet, plus 3 fp32 `step` scalars per layer
    for r in (1, 7, 64):
        assert layer_bytes(384, 1536, r, ADAMW) == r * (384 + 1536 + 1) * 24 + 3 * 4


def test_eight_bit_adamw_costs_less():
    eight = StateCost("adamw8bit")
    assert layer_bytes(384, 384, 8, eight) < layer_bytes(384, 384, 8, ADAMW)
    n = 8 * 384
    assert layer_bytes(384, 384, 8, eight) == 2 * (16 * n + 2 * n + 8 * (n // 256)) + (16 * 8 + 2 * 8 + 8)


def test_auto_rank_is_largest_that_fits():
    shapes = [LayerShape("a", 64, 64), LayerShape("b", 64, 256)]
    budget = layer_bytes(64, 64, 5, ADAMW) + layer_bytes(64, 256, 5, ADAMW) + 100
    plan = plan_initial_rank(shapes, budget, ADAMW, fixed=100)
    assert plan.rank == 5 and plan.binding == "budget" and plan.adapter_bytes == budget
    plan = plan_initial_rank(shapes, budget - 1, ADAMW, fixed=100)
    assert plan.rank == 4


def test_caps_by_max_init_rank_and_width():
    shapes = [LayerShape("a", 64, 64), LayerShape("b", 64, 16)]
    plan = plan_initial_rank(shapes, 10**9, ADAMW, fixed=0, max_init_rank=8)
    assert (plan.rank, plan.binding) == (8, "max_init_rank")
    plan = plan_initial_rank(shapes, 10**9, ADAMW, fixed=0, max_init_rank=64)
    assert (plan.rank, plan.binding) == (16, "layer width")


def test_too_small_budget_names_the_minimum():
    shapes = [LayerShape("a", 384, 384)] * 36
    need = 36 * layer_bytes(384, 384, 1, ADAMW) + 1000
    assert round(need / 2**20, 4) == 0.635
    with pytest.raises(BudgetError, match=r"smallest workable budget is 0\.64 MiB \(--budget-mb 0\.64\)") as err:
        plan_initial_rank(shapes, need - 1, ADAMW, fixed=1000)
    assert "a budget of 0.63 MiB cannot give each of the 36 target layers rank 1" in str(err.value)
    assert plan_initial_rank(shapes, need, ADAMW, fixed=1000).rank == 1


def test_requested_rank_must_fit():
    shapes = [LayerShape("a", 64, 64)]
    assert plan_initial_rank(shapes, 10**6, ADAMW, 0, rank=4).binding == "requested"
    with pytest.raises(BudgetError, match="rank 40 needs"):
        plan_initial_rank(shapes, 10**5, ADAMW, 0, rank=40)
