"""The plan's activation figure comes from a step traced on fake tensors: depth extrapolation, no allocation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qelalora.base.footprint import TensorBytes
from qelalora.base.models import arch_spec, head_params, target_paths, wrap_linears
from qelalora.run.plan.trace import _trace, trace_step_bytes
from tests.conftest import llama_config

BATCH, SEQ = 4, 32


def _builders(dtype=torch.float32, **overrides):
    def build(n: int):
        return AutoModelForCausalLM.from_config(llama_config(num_hidden_layers=n, **overrides), dtype=dtype)

    def wrap(model):
        spec = arch_spec(model.config, "causal-lm")
        wrap_linears(model, target_paths(model, spec, None), 4, 16.0, start="lora", score_state="triplet")
        head_params(model, spec)

    return build, wrap


@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_traced_blocks_extended_to_six_equal_a_six_block_trace(checkpointing):
    build, wrap = _builders()
    extended = trace_step_bytes(build, wrap, 6, "causal-lm", BATCH, SEQ, 2 * BATCH, checkpointing, 0, 2**20)
    step, step_small, evaluation, evaluation_small = _trace(lambda: build(6), wrap, "causal-lm", BATCH, SEQ, 2 * BATCH,
                                                            checkpointing, 2**20)
    assert extended.step == pytest.approx(step, rel=0.01 if checkpointing else 0)
    assert extended.step_small == pytest.approx(step_small, rel=0.01 if checkpointing else 0)
    assert extended.evaluation == evaluation and extended.evaluation_small == evaluation_small


def test_the_trace_counts_what_a_real_step_allocates():
    """Same model, real tensors: the storages a real forward + backward creates (counted as CUDA counts them)
    equal the traced figure to within a few percent (the trace's batch is all ones, the real one random)."""
    build, wrap = _builders()
    traced = trace_step_bytes(build, wrap, 3, "causal-lm", BATCH, SEQ, 2 * BATCH, False, 0, 2**20)
    torch.manual_seed(0)
    model = build(3)
    for p in model.parameters():
        p.requires_grad_(False)
    wrap(model)
    ids = torch.randint(1, 128, (BATCH, SEQ))
    with TensorBytes() as counted:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    assert counted.peak == pytest.approx(traced.step, rel=0.03)
    assert traced.step_small == traced.step  # no block of this tiny model reaches the 1 MiB asked about
    large = trace_step_bytes(build, wrap, 3, "causal-lm", BATCH, SEQ, 2 * BATCH, False, 0, 2**10)
    assert large.step == traced.step and 0 < large.step_small < traced.step  # with 1 kB, a few blocks are larger
    assert traced.evaluation < traced.step


def test_tracing_allocates_nothing_for_a_large_config():
    """An 8B-wide block (4096 hidden, 14336 FFN) at 8 x 512 tokens: gigabytes traced, nothing allocated."""
    import psutil

    build, wrap = _builders(torch.bfloat16, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            vocab_size=32000, max_position_embeddings=512)
    before = psutil.Process().memory_info().rss
    traced = trace_step_bytes(build, wrap, 32, "causal-lm", 8, 512, 16, False, 0, 32 * 2**20)
    assert traced.step > 10 * 2**30
    assert psutil.Process().memory_info().rss - before < 200 * 2**20


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_plan_traces_a_classifier_in_either_compute_dtype(tiny_bert_dir, device, capsys):
    """On CUDA the plan traces in bf16 with the trained head upcast to fp32, as a run loads them; nothing falls
    back to the formula."""
    from qelalora.run.plan.memory_plan import memory_plan
    from qelalora.run.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name": tiny_bert_dir, "task": "seq-cls"}, "data": {"max_length": 32},
                               "train": {"batch_size": 4}})
    plan = memory_plan(recipe, device=device, device_bytes=24 * 10**9)
    assert plan.footprint.traced and "formula" not in capsys.readouterr().err
    assert plan.footprint.activation_bytes > 0 and (plan.footprint.process_bytes is None) == (device == "cuda")
