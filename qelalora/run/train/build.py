"""A recipe made ready to train: the plan, the NF4 model with its ElaLoRA layers, the tokenised data, the
optimiser and the batch stream (the same for `train` and for `plan --measure`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from qelalora.base import embedded
from qelalora.base.footprint import release_free_heap
from qelalora.base.models import ArchSpec, head_params, load_base_model, target_paths
from qelalora.method.config import steps_of

from ..data.batches import BatchStream
from ..data.records import TaskData, load_task_data
from ..plan.memory_plan import MemoryPlan, memory_plan, resolve_device
from ..recipe import Recipe
from . import distributed
from .distributed import GradientAverager, Processes
from .step import TrainState, prepare_training


@dataclass
class Run:
    recipe: Recipe
    model: torch.nn.Module
    spec: ArchSpec
    data: TaskData
    state: TrainState
    stream: BatchStream
    device: str
    plan: MemoryPlan


def build_run(recipe: Recipe, log=print, procs: Processes = Processes(), device: str | None = None) -> Run:
    from transformers import AutoTokenizer

    plan = memory_plan(recipe, procs.world)
    log(plan.describe())
    device = device or resolve_device(recipe.train.device)
    torch.manual_seed(recipe.train.seed)
    name = embedded.resolve_model(recipe.model.name)
    model, spec = load_base_model(
        name, recipe.model.quantize, recipe.model.num_labels, device, recipe.model.trust_remote_code, task=recipe.model.task
    )
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    data = load_task_data(recipe.data, spec.task, tokenizer, recipe.model.num_labels)
    release_free_heap()  # the raw records and the tokeniser's lists are garbage now
    if data.label_names:  # classes named in the data: the model's config (and so the PEFT copy) names them too
        model.config.id2label = dict(enumerate(data.label_names))
        model.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    log(f"data: {recipe.data.source}: {data.sizes()['train']} train / {data.sizes()['val']} val / {data.sizes()['test']} test")
    paths = target_paths(model, spec, recipe.model.targets)
    t = recipe.train
    if plan.checkpointing:  # the non-reentrant form needs no input that requires grad (the base is frozen)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    state = prepare_training(
        model,
        paths,
        head_params(model, spec),
        recipe.elalora,
        total_steps=t.steps,
        lr=t.lr,
        warmup_steps=steps_of(t.warmup_steps, t.steps),
        weight_decay=t.weight_decay,
        seed=t.seed,
        weights_from=name,
    )
    if procs.active:  # same start everywhere, own dropout stream, gradients averaged, rounds compared
        distributed.broadcast_params(state.trainable_params())
        distributed.seed_process(procs, t.seed)
        state.after_backward = GradientAverager(spec.task)
        state.after_round = partial(distributed.check_round, procs)
    stream = BatchStream(data.train, t.batch_size, data.pad_id, t.seed, procs.rank, procs.world)
    return Run(recipe, model, spec, data, state, stream, device, plan)
