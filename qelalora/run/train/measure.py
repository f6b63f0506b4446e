"""`qelalora plan --measure`: load the model, run two real steps at the recipe's largest shapes, and set what
memory they took beside what the plan predicted.

The plan is computed from the config alone; this is its check on the machine
at hand. Measured: before planning and loading (the baseline, as `train` reads it), after the model, data and
adapters are in place (resident), the peak over loading, over two training
steps of `train.batch_size` x `data.max_length` tokens (the longest batch the
run can see), and over one evaluation batch (twice as many rows). On CUDA the figures are
`torch.cuda.max_memory_allocated` (tensors only); on a CPU, the process's RSS
above the baseline, which also counts library code and allocator slack.
"""

from __future__ import annotations

import gc

import torch

from qelalora.base.footprint import (Footprint, PeakRSS, TensorBytes, current_rss_bytes, live_tensor_bytes,
                                     release_free_heap)
from qelalora.units import mib

from ..plan.memory_plan import EVAL_BATCH_FACTOR, MemoryPlan
from ..recipe import Recipe
from .build import Run, build_run
from .evaluate import evaluate
from .step import model_loss, train_step


def longest_batch(task: str, batch: int, seq: int, vocab: int, num_labels: int, device: str) -> dict:
    """Random tokens at the recipe's batch size and full sequence length (the activations' worst case)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (batch, seq), generator=g)
    labels = torch.randint(0, num_labels, (batch,), generator=g) if task == "seq-cls" else ids.clone()
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def predicted_figures(fp: Footprint) -> dict:
    """The plan's figures under the names `measure` reports its measurements."""
    return {"resident": fp.base_bytes + fp.adapter_bytes, "activations": fp.activation_bytes, "evaluation": fp.eval_bytes,
            "load_peak": fp.load_peak_bytes, "total": fp.total_bytes, "process_resident": fp.process_resident_bytes,
            "process_total": fp.process_bytes}


def measure(recipe: Recipe, steps: int = 2) -> tuple[MemoryPlan, dict]:
    """Run the recipe's model for `steps` steps in this process; returns its plan, and predicted and measured bytes.
    The plan is made after the starting RSS is read, as `train` makes it, so the figures cover the same things.

    On a CPU one more step runs under `TensorBytes`, which counts tensors only (what CUDA's figures count), so
    the process's memory can be told apart from its tensors'.
    """
    cuda = recipe.train.device.startswith("cuda") or (recipe.train.device == "auto" and torch.cuda.is_available())
    rss = PeakRSS()
    gc.collect()
    baseline, tensors_before = current_rss_bytes(), live_tensor_bytes()
    rss.reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = build_run(recipe, log=lambda *a, **k: None)
    gc.collect()
    resident = torch.cuda.memory_allocated() if cuda else current_rss_bytes() - baseline
    load_peak = torch.cuda.max_memory_allocated() if cuda else rss.peak() - baseline
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss.reset()
    t = recipe.train
    batch = longest_batch(run.spec.task, t.batch_size, recipe.data.max_length, run.model.config.vocab_size,
                          recipe.model.num_labels, run.device)
    for _ in range(steps):
        train_step(run.state, batch, model_loss)
    step_peak = torch.cuda.max_memory_allocated() if cuda else rss.peak() - baseline
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    release_free_heap()  # as `evaluate` does first, before the high-water mark restarts
    rss.reset()
    held_out = _longest_held_out(run)

    def evaluation():
        evaluate(run.model, held_out, run.spec.task, len(held_out), run.data.pad_id, run.device)

    evaluation()
    eval_peak = torch.cuda.max_memory_allocated() if cuda else rss.peak() - baseline
    fp = run.plan.footprint
    result = {
        "measured_with": "torch.cuda.max_memory_allocated" if cuda else "RSS above the process before planning and loading",
        "steps": steps,
        "shape": {"batch": t.batch_size, "seq": recipe.data.max_length},
        "predicted": predicted_figures(fp),
        "measured": {"resident": resident, "load_peak": load_peak, "peak": max(step_peak, eval_peak, load_peak),
                     "step_peak_above_resident": max(0, step_peak - resident),
                     "eval_peak_above_resident": max(0, eval_peak - resident)},
    }
    if not cuda:  # the same figures over tensors only, as CUDA counts them (optimiser state exists by now)
        result["tensors"] = _tensor_figures(run, batch, evaluation, tensors_before)
    return run.plan, result


def _longest_held_out(run: Run) -> list[dict]:
    """One evaluation batch of the longest examples the recipe allows."""
    t, recipe = run.recipe.train, run.recipe
    held_out = [{"input_ids": row.tolist()} for row in longest_batch(
        run.spec.task, EVAL_BATCH_FACTOR * t.batch_size, recipe.data.max_length, run.model.config.vocab_size,
        recipe.model.num_labels, "cpu")["input_ids"]]
    return [{**e, "labels": 0} for e in held_out] if run.spec.task == "seq-cls" else held_out


def _tensor_figures(run: Run, batch: dict, evaluation, tensors_before: int) -> dict:
    """One more step and evaluation under `TensorBytes`: the figures over tensors only, as CUDA counts them."""
    gc.collect()
    at_rest = live_tensor_bytes() - tensors_before
    with TensorBytes() as counted:
        train_step(run.state, batch, model_loss)
    with TensorBytes() as counted_eval:
        evaluation()
    return {"resident": at_rest, "peak": at_rest + max(counted.peak, counted_eval.peak),
            "step_peak_above_resident": counted.peak, "eval_peak_above_resident": counted_eval.peak}


def describe(result: dict) -> str:
    p, m, tensors = result["predicted"], result["measured"], result.get("tensors")
    cuda = tensors is None  # on CUDA the measured figures are tensors already

    def column(n: int | None) -> str:
        return f"{mib(n):9.1f}" if n is not None else f"{'':9s}"

    def ratio(measured: int | None, predicted: int | None) -> str:
        return f"{measured / predicted:6.2f}x" if measured is not None and predicted else f"{'':7s}"

    def row(name: str, predicted: int | None, key: str, process_predicted: int | None = None) -> str:
        counted = m[key] if cuda else tensors.get(key)
        line = f"  {name:<32s}{column(predicted)} {column(counted)} {ratio(counted, predicted)}"
        if cuda:
            return line
        return line + f" {column(process_predicted)} {column(m[key])} {ratio(m[key], process_predicted)}"

    head = f"  {'':32s}{'predicted':>9s} {'tensors':>9s} {'ratio':>7s}" + (
        "" if cuda else f" {'predicted':>9s} {'process':>9s} {'ratio':>7s}")
    notes = [] if cuda else [
        "  tensors: the storages torch allocates (what a GPU's max_memory_allocated counts); process: RSS above the",
        "  process before planning, which also holds the code and tokeniser loaded with the model and the plan, and",
        "  the C heap's freed but kept blocks (glibc keeps a step's freed activation blocks until the step ends).",
    ]
    return "\n".join([
        f"Measured ({result['steps']} steps at batch {result['shape']['batch']} x {result['shape']['seq']} tokens"
        f"{'; torch.cuda.max_memory_allocated' if cuda else ''}), MiB:",
        head,
        row("model + adapters (+ data, RSS)", p["resident"], "resident", p.get("process_resident")),
        *([] if cuda else [f"  {'loading peak':<32s}{column(p.get('load_peak'))} {column(None)} {'':7s} {column(None)} {column(m['load_peak'])}"]),
        row("steps above that (activations)", p["activations"], "step_peak_above_resident"),
        row("evaluation above that", p["evaluation"] or None, "eval_peak_above_resident"),
        row("peak", p["total"], "peak", p.get("process_total")),
        *notes,
    ])
