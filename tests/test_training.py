import torch
import torch.nn as nn
from transformers import get_linear_schedule_with_warmup

from qelalora.base.models import head_params, load_base_model, target_paths
from qelalora.method.config import ElaLoRAConfig
from qelalora.method.layer import measure_adapter_bytes
from qelalora.run.train.step import prepare_training, train
from tests.helpers import cls_batches, hf_loss, lm_batches


def _llama_run(model_dir, cfg, steps, seed=0, on_step=None, lr=5e-3):
    torch.manual_seed(seed)
    model, spec = load_base_model(model_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    state = prepare_training(model, paths, head_params(model, spec), cfg, steps, lr=lr, warmup_steps=5, seed=seed)
    train(state, lm_batches(128, seed=seed), steps, hf_loss, on_step)
    return state


def test_budget_holds_at_every_step_with_frequent_rounds(tiny_llama_dir):
    # q/k/v/o/gate/up/down of the tiny Llama have widths 64x64, 64x32, 64x128, 128x64: unequal triplet costs
    for optimizer in ("adamw", "adamw8bit"):
        cfg = ElaLoRAConfig(budget_mb=0.3, t_init=10, t_final=20, delta=2, b0=6, k=2, optimizer=optimizer)
        seen = []

        def check(state, loss):
            measured = measure_adapter_bytes(list(state.layers.values()), state.head_params, state.optimizer)
            assert measured <= cfg.budget_bytes, (state.step, measured)
            assert measured == state.ranks.adapter_bytes()  # the planner's bytes are the real bytes
            seen.append(measured)

        state = _llama_run(tiny_llama_dir, cfg, 200, on_step=check)
        assert len(seen) == 200
        rounds = state.ranks.history
        assert len(rounds) == 84  # steps 12, 14, ..., 178
        assert any(r.pruned for r in rounds) and any(r.grown for r in rounds)
        for r in rounds:
            assert r.adapter_bytes <= cfg.budget_bytes
            assert not set(r.pruned) & set(r.grown)
        pattern = state.ranks.rank_pattern()
        assert len(pattern) == 14 and len(set(pattern.values())) > 1, pattern


def test_training_continues_after_evaluation_on_nf4(tiny_bert_dir):
    from qelalora.run.train.evaluate import evaluate

    torch.manual_seed(0)
    model, spec = load_base_model(tiny_bert_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    cfg = ElaLoRAConfig(budget_mb=0.25, t_init=5, t_final=5, delta=3)
    state = prepare_training(model, paths, head_params(model, spec), cfg, 20, lr=5e-3)
    batches = cls_batches(128)
    train(state, batches, 5, hf_loss)
    examples = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8, 9], "labels": 0}]
    before = evaluate(model, examples, "seq-cls", 2, 0, "cpu")
    train(state, batches, 5, hf_loss)  # bitsandbytes must not have repacked the NF4 weights in eval mode
    assert before["examples"] == 2 and state.step == 10


def test_evaluation_batches_by_length_and_scores_as_one_batch(tiny_bert_dir, tiny_llama_dir):
    from qelalora.run.data.batches import eval_batches
    from qelalora.run.train.evaluate import evaluate

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (23,), generator=g).tolist()
    examples = [{"input_ids": torch.randint(3, 120, (n,), generator=g).tolist(), "labels": i % 2} for i, n in enumerate(lengths)]
    batches = list(eval_batches(examples, 4, 0))
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths) and sum(int(b["attention_mask"].sum()) for b in batches) == sum(lengths)
    assert sum(b["input_ids"].numel() for b in batches) < len(examples) * max(lengths) * 0.7  # padding cut
    limited = list(eval_batches(examples, 4, 0, limit=2))  # the first 8 examples, still each once
    assert sorted(len(e["input_ids"]) for e in examples[:8]) == [int(m.sum()) for b in limited for m in b["attention_mask"]]
    for model_dir, task in ((tiny_bert_dir, "seq-cls"), (tiny_llama_dir, "causal-lm")):
        torch.manual_seed(0)
        model, _ = load_base_model(model_dir, quantize="nf4")
        data = examples if task == "seq-cls" else [{"input_ids": e["input_ids"]} for e in examples]
        by_length = evaluate(model, data, task, 4, 0, "cpu")
        one_batch = evaluate(model, data, task, len(data), 0, "cpu")
        assert by_length.keys() == one_batch.keys()
        for key in by_length:
            assert abs(by_length[key] - one_batch[key]) <= 1e-5 * max(1.0, abs(one_batch[key])), (task, key)


def test_lr_follows_the_schedule_with_or_without_rounds(tiny_llama_dir):
    steps, lr = 60, 5e-3
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    ref_sched = get_linear_schedule_with_warmup(ref_opt, 5, steps)
    expected = []
    for _ in range(steps):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref_sched.step()
    for b0 in (4, 0):
        cfg = ElaLoRAConfig(budget_mb=0.3, t_init=5, t_final=10, delta=3, b0=b0)
        lrs = []
        state = _llama_run(
            tiny_llama_dir, cfg, steps, on_step=lambda s, _: lrs.append(s.scheduler.get_last_lr()[0]), lr=lr
        )
        # get_last_lr after step t is the LR used at step t + 1
        assert lrs[:-1] == expected[1:]
        assert all(group["lr"] == lrs[-1] for group in state.optimizer.param_groups)
        assert any(r.pruned for r in state.ranks.history) == (b0 > 0)


def test_same_seed_same_ranks_and_weights(tiny_bert_dir):
    def run():
        torch.manual_seed(3)  # the classifier head is freshly initialised
        model, spec = load_base_model(tiny_bert_dir, quantize="nf4")
        paths = target_paths(model, spec, list(spec.targets))
        cfg = ElaLoRAConfig(budget_mb=0.25, t_init=5, t_final=10, delta=3, b0=3)
        state = prepare_training(model, paths, head_params(model, spec), cfg, 50, lr=5e-3, seed=3)
        train(state, cls_batches(128, seed=3), 50, hf_loss)
        return state

    a, b = run(), run()
    assert a.ranks.history and a.ranks.rank_pattern() == b.ranks.rank_pattern()
    for (na, la), (_, lb) in zip(a.layers.items(), b.layers.items()):
        for pa, pb in zip(la.adapter_params(), lb.adapter_params()):
            assert torch.equal(pa, pb), na
    for pa, pb in zip(a.head_params, b.head_params):
        assert torch.equal(pa, pb)


class _Stack(nn.Module):
    """Three frozen linears with residual connections; the task only needs layer 1 to change."""

    def __init__(self, d=24):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + torch.tanh(self.l0(x))
        x = x + self.l1(x)
        return x + torch.tanh(self.l2(x))


def test_rank_moves_to_the_layer_that_matters():
    d = 24
    torch.manual_seed(0)
    student = _Stack(d)
    teacher = _Stack(d)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():  # teacher's layer 1 differs by a rank-10 update
        u, v = torch.randn(d, 10), torch.randn(10, d)
        teacher.l1.weight += 0.15 * u @ v / d**0.5
    for p in student.parameters():
        p.requires_grad_(False)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(64, d, generator=g)
            yield x, teacher(x).detach()

    cfg = ElaLoRAConfig(rank=4, budget_mb=1.0, t_init=20, t_final=40, delta=10, b0=2, k=2, gamma=0.0, alpha=4)
    state = prepare_training(student, ["l0", "l1", "l2"], [], cfg, 400, lr=1e-2, seed=0)
    losses = train(state, batches(), 400, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    ranks = state.ranks.rank_pattern()
    assert ranks["l1"] > 4 and ranks["l1"] > max(ranks["l0"], ranks["l2"]), ranks
    assert losses[-1] < 0.2 * losses[0]
