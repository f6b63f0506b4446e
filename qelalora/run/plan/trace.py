"""Activation bytes from one training step run on fake tensors: the plan's figure for any architecture.

A formula for a transformer layer's activations holds for the layer it was
derived for and drifts elsewhere: it missed Gemma-3's 256-wide heads and GeGLU
MLP by 1.45x, and it charges every model the s^2 attention scores that only the
unfused attention paths keep (SDPA's fused CPU kernel keeps none: SmolLM2 at
2 x 512 tokens measured 0.64x of the formula). Here the model is built from its
config under PyTorch's FakeTensorMode (shapes and dtypes, no storage), the
adapters and heads are put in place as in a run, and one forward and backward
pass at the recipe's batch runs; every storage an op creates is counted from
creation until it is freed, as CUDA's allocator counts `max_memory_allocated`.
No weights are read and nothing is allocated: a 1B model traces in seconds.

What the trace does not see: the NF4 base's dequantised weight, which
bitsandbytes makes for one linear at a time (added here as the largest one), and
allocator slack (CUDA's caching allocator, the C heap on a CPU; see `footprint`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from qelalora.base.footprint import TensorBytes


@dataclass(frozen=True)
class TracedBytes:
    step: int  # peak over one forward + backward pass above the resident model (activations, gradients)
    evaluation: int  # peak of one no-grad forward at the evaluation batch
    step_small: int  # of `step`, the bytes at the peak in storages under `small` (those a C heap serves)
    evaluation_small: int  # the same for `evaluation`


class _FakeStepBytes(TensorBytes):
    """`TensorBytes` over fake tensors. Scalars read from tensors (`.item()`) come back as 1: models read them to
    ask whether a mask has padding, and the traced batch has none."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def trace_step_bytes(build_model, wrap, layers: int, task: str, batch: int, seq: int, eval_batch: int,
                     checkpointing: bool, largest_weight_bytes: int, small: int) -> TracedBytes:
    """Trace one training step and one evaluation batch of `build_model(n)` (the model cut to n blocks, in its
    compute dtype) after `wrap(model)` (adapters, trainable heads); both callables run under FakeTensorMode, so
    they allocate nothing.

    Blocks repeat, so what a step keeps for backward is linear in the depth (exactly; with gradient
    checkpointing to within a few kB): one- and two-block models are traced
    and the line is extended to `layers` (a 32-block 8B config costs what two blocks cost). Evaluation keeps
    nothing between blocks, so its peak is the two-block model's. `small`: the size under which storages are
    counted apart (`TracedBytes.step_small`)."""
    one = _trace(lambda: build_model(1), wrap, task, batch, seq, eval_batch, checkpointing, small)
    two = _trace(lambda: build_model(2), wrap, task, batch, seq, eval_batch, checkpointing, small) if layers > 1 else one
    step, step_small = (a + (layers - 1) * (b - a) for a, b in zip(one[:2], two[:2]))
    evaluation, evaluation_small = two[2:]
    return TracedBytes(step + largest_weight_bytes, evaluation + largest_weight_bytes, step_small, evaluation_small)


def _trace(build, wrap, task: str, batch: int, seq: int, eval_batch: int, checkpointing: bool,
           small: int) -> tuple[int, int, int, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build()
        for p in model.parameters():
            p.requires_grad_(False)
        wrap(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with _FakeStepBytes(small) as step:
            _loss(model, task, batch, seq, use_cache=False).backward()  # a cache holds what backward keeps anyway
        model.eval()
        with torch.no_grad(), _FakeStepBytes(small) as evaluation:
            _loss(model, task, eval_batch, seq, use_cache=False)
    return step.peak, step.peak_small, evaluation.peak, evaluation.peak_small


def _loss(model: nn.Module, task: str, batch: int, seq: int, **kwargs) -> torch.Tensor:
    ids = torch.ones(batch, seq, dtype=torch.long)
    if task == "seq-cls":
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(batch, dtype=torch.long)).loss
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, **kwargs).loss
