"""The memory plan: initial ranks and the predicted footprint, from the model's config alone (no weights).

`qelalora plan` prints it, `train` logs it and keeps it in the run folder
beside what the run measured, and `plan --gpu-gb` asks it about a GPU this
machine does not have. The config comes from the model (local folder, hub
cache) or, offline, from the recipe's own `model.config`.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, replace

import torch

from qelalora.base import embedded
from qelalora.base.footprint import (C_HEAP_MMAP_LIMIT, Footprint, activation_bytes, base_bytes, eval_bytes,
                                     largest_dequantized_bytes, loading_bytes, process_bytes)
from qelalora.base.hub import go_offline_if_unreachable
from qelalora.base.models import arch_spec, head_modules, head_params, select_targets, target_paths, wrap_linears
from qelalora.errors import UserError
from qelalora.method.budget import RankPlan
from qelalora.units import fmt_mib

from ..recipe import Recipe
from .ranks import plan_ranks, target_shapes
from .trace import TracedBytes, trace_step_bytes

EVAL_BATCH_FACTOR = 2  # evaluation batches are twice the training batch (no autograd state to hold)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("train.device asks for CUDA but no CUDA device is available; use train.device=cpu")
    return name


@dataclass
class MemoryPlan:
    rank_plan: RankPlan
    footprint: Footprint
    n_layers: int
    model_name: str
    batch: int
    seq: int
    checkpointing: bool = False  # gradient checkpointing on for this run
    activations_other: int = 0  # the activation estimate with the other checkpointing choice
    targets: tuple[str, ...] = ()  # adapted linears inside one block
    discovered: bool = False  # targets found in the model (architecture not in the table)
    processes: int = 1  # training processes; each holds the base and the adapters, so every figure is per process
    device: str = "cpu"

    def to_dict(self) -> dict:
        rp = self.rank_plan
        return {
            "model": self.model_name,
            "target_layers": self.n_layers,
            "initial_rank": rp.rank,
            "rank_limited_by": rp.binding,
            "budget_bytes": rp.budget_bytes,
            "adapter_bytes": rp.adapter_bytes,
            "budget_used": rp.budget_used,
            "min_budget_bytes": rp.min_budget_bytes,
            "footprint": self.footprint.to_dict(),
            "activations_at": {"batch": self.batch, "seq": self.seq},
            "targets": list(self.targets),
            "discovered": self.discovered,
            "gradient_checkpointing": self.checkpointing,
            "activation_bytes_other_choice": self.activations_other,
            "processes": self.processes,
        }

    def describe(self) -> str:
        rp, fp = self.rank_plan, self.footprint
        return (
            f"Memory plan: {self.model_name}, {self.n_layers} target layers, budget {fmt_mib(rp.budget_bytes)}\n"
            f"  targets per block: {', '.join(self.targets)}"
            f"{' (found in the model: its architecture is not in the table)' if self.discovered else ''}\n"
            f"  initial rank {rp.rank} per layer (limited by {rp.binding}); adapter state "
            f"{fmt_mib(rp.adapter_bytes)} = {100 * rp.budget_used:.1f}% of the budget "
            f"(smallest workable budget: {fmt_mib(rp.min_budget_bytes)})\n"
            f"  predicted footprint: base {fmt_mib(fp.base_bytes)} + adapter state {fmt_mib(fp.adapter_bytes)} + "
            f"activations ~{fmt_mib(fp.activation_bytes)} (batch {self.batch} x {self.seq} tokens)"
            + (f", or evaluation ~{fmt_mib(fp.eval_bytes)} (batch {EVAL_BATCH_FACTOR * self.batch})" if fp.eval_bytes else "")
            + f" = {fmt_mib(fp.total_bytes)}"
            + (f" (the loading peak: base + its largest tensor read, {fmt_mib(fp.loading_bytes)})"
               if fp.load_peak_bytes == fp.total_bytes else "")
            + "\n"
            f"  gradient checkpointing {'on' if self.checkpointing else 'off'} "
            f"(activations ~{fmt_mib(self.activations_other)} with it {'off' if self.checkpointing else 'on'})"
            + (f"\n  on this CPU the process should peak near {fmt_mib(fp.process_bytes)} above its start: these tensors, "
               f"the code and tokeniser loaded with the model and the plan, and the freed blocks the C heap keeps during a step"
               if fp.process_bytes else "")
            + ("" if fp.traced else "\n  activations by formula (tracing a step failed): expect them off by up to 1.5x")
            + (f"\n  {self.processes} processes: each holds the base and the adapters, so the budget and every figure "
               f"above are per process; the global batch is {self.processes} x {self.batch}" if self.processes > 1 else "")
        )


def _load_config(recipe: Recipe):
    from transformers import AutoConfig

    name = embedded.resolve_model(recipe.model.name)
    if recipe.model.trust_remote_code:
        print("note: trust_remote_code is on: the model's own Python code will run")
    offline = go_offline_if_unreachable(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as err:
        if recipe.model.config:
            print(f"note: {recipe.model.name} is not reachable; planning from the recipe's model.config", file=sys.stderr)
            return name, _config_from_recipe(recipe)
        where = "offline (HF_HUB_OFFLINE, or the hub is unreachable) and not in the local cache: " if offline else ""
        raise UserError(
            f"cannot load model {recipe.model.name!r}: {where}{str(err).splitlines()[0][:300]} "
            "(give a local Hugging Face folder, a hub id while online, or embedded:minilm-l6 / embedded:smollm2-135m)"
        ) from None
    return name, config


def _config_from_recipe(recipe: Recipe):
    """The architecture as the recipe states it (model.config), for plans made without the weights."""
    from transformers import AutoConfig

    fields = dict(recipe.model.config)
    model_type = fields.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as err:
        raise UserError(f"model.config in the recipe is not a transformers config: {str(err)[:300]}") from None


def _check_sequence_length(recipe: Recipe, config) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and recipe.data.max_length > limit:
        raise UserError(
            f"data.max_length {recipe.data.max_length} is over the model's limit of {limit} positions; "
            f"set data.max_length to {limit} or less"
        )


def memory_plan(recipe: Recipe, processes: int = 1, device: str | None = None, device_bytes: int | None = None) -> MemoryPlan:
    """Initial ranks and predicted footprint, from the model's config alone (no weights loaded).

    `device` and `device_bytes` plan for a device other than this machine's (`qelalora plan --gpu-gb`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name, config = _load_config(recipe)
    spec = arch_spec(config, recipe.model.task)
    _check_sequence_length(recipe, config)
    if spec.task == "seq-cls":
        config.num_labels = recipe.model.num_labels
    auto = AutoModelForSequenceClassification if spec.task == "seq-cls" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    device = device or resolve_device(recipe.train.device)
    dtype_bytes = 2 if device.startswith("cuda") else 4
    paths = target_paths(model, spec, recipe.model.targets)
    heads = [p.numel() for module in head_modules(model, spec) for p in module.parameters()]
    _, _, rp = plan_ranks(target_shapes(model, paths), heads, recipe.elalora)
    e, t = recipe.elalora, recipe.train
    base = base_bytes(model, recipe.model.quantize, spec.unquantized, dtype_bytes)
    shape = (t.batch_size, recipe.data.max_length, EVAL_BATCH_FACTOR * t.batch_size)
    traced = {on: _traced(recipe, config, spec, auto, config.num_hidden_layers, rp.rank, shape, device, on,
                          largest_dequantized_bytes(model, recipe.model.quantize, spec.unquantized, dtype_bytes))
              for on in (False, True)}
    acts = {on: traced[on].step if traced[on] else
            activation_bytes(config, t.batch_size, recipe.data.max_length, dtype_bytes, spec.task == "causal-lm", on)
            for on in (False, True)}
    if t.gradient_checkpointing == "auto":
        checkpointing = device.startswith("cuda") and base + rp.adapter_bytes + acts[False] > (device_bytes or _device_bytes(device))
    else:
        checkpointing = bool(t.gradient_checkpointing)
    chosen_trace = traced[checkpointing]
    evaluation = chosen_trace.evaluation if chosen_trace else eval_bytes(config, shape[2], shape[1], spec.task == "causal-lm")
    fp = Footprint(base_bytes=base, adapter_bytes=rp.adapter_bytes, activation_bytes=acts[checkpointing], budget_bytes=e.budget_bytes,
                   eval_bytes=evaluation, traced=chosen_trace is not None, loading_bytes=loading_bytes(model, dtype_bytes))
    if device == "cpu":
        fp.process_resident_bytes, fp.process_bytes = process_bytes(fp, chosen_trace, config.vocab_size)
    chosen = tuple(spec.targets[k] for k in select_targets(spec, recipe.model.targets))
    return MemoryPlan(rp, fp, len(paths), recipe.model.name, t.batch_size, recipe.data.max_length, checkpointing,
                      acts[not checkpointing], chosen, spec.discovered, processes, device)


def _traced(recipe: Recipe, config, spec, auto, layers: int, rank: int, shape: tuple[int, int, int], device: str,
            checkpointing: bool, dequantized: int) -> TracedBytes | None:
    """One traced step (see `trace`); None, with a note, where the model's code cannot run on fake tensors."""
    e = recipe.elalora
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def build(n: int):
        return auto.from_config(_cut(config, n), trust_remote_code=recipe.model.trust_remote_code, dtype=dtype)

    def wrap(model):
        paths = target_paths(model, spec, recipe.model.targets)
        wrap_linears(model, paths, rank, e.alpha, dropout=e.dropout, start="lora", score_state=e.score_state)
        head_params(model, spec)

    try:
        return trace_step_bytes(build, wrap, layers, spec.task, *shape, checkpointing, dequantized, C_HEAP_MMAP_LIMIT)
    except Exception as err:  # noqa: BLE001  a model's own code can fail on fake tensors in any way; the formula stands in
        print(f"note: activations estimated by formula (tracing a step failed: {type(err).__name__}: "
              f"{str(err).splitlines()[0][:200] if str(err) else ''})", file=sys.stderr)
        return None


def _cut(config, n: int):
    """A copy of `config` with its first `n` blocks (per-block lists such as Gemma-3's `layer_types` cut too)."""
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = n
    if isinstance(getattr(cut, "layer_types", None), list):
        cut.layer_types = cut.layer_types[:n]
    return cut


def gpu_fit(recipe: Recipe, gb: float) -> dict:
    """The plan on a CUDA GPU of `gb` GB (bf16 compute), with and without gradient checkpointing (one plan holds
    the activations both ways)."""
    total = int(gb * 10**9)
    out = {"gpu_bytes": total, "batch": recipe.train.batch_size, "seq": recipe.data.max_length}
    plan = memory_plan(recipe, device="cuda", device_bytes=total)
    activations = {plan.checkpointing: plan.footprint.activation_bytes, not plan.checkpointing: plan.activations_other}
    for on in (False, True):
        need = replace(plan.footprint, activation_bytes=activations[on]).total_bytes
        out["with_checkpointing" if on else "without_checkpointing"] = {"bytes": need, "fits": need <= total}
    return out


def describe_gpu_fit(fit: dict) -> str:
    def line(key: str, name: str) -> str:
        f = fit[key]
        return f"    {name}: {fmt_mib(f['bytes'])} ({'fits' if f['fits'] else 'does not fit'})"

    return "\n".join([
        f"  on a {fit['gpu_bytes'] / 10**9:g} GB GPU (bf16 compute, batch {fit['batch']} x {fit['seq']} tokens; tensors, "
        "plus a few hundred MB for the CUDA context):",
        line("without_checkpointing", "without gradient checkpointing"),
        line("with_checkpointing", "with gradient checkpointing"),
    ])


def _device_bytes(device: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).total_memory
