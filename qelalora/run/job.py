"""`qelalora train`: a recipe in, a run directory out.

The flow is the one in the design: recipe -> memory plan -> NF4 model with
ElaLoRA layers -> train loop (checkpoints, metrics) -> run directory with
adapters, rank pattern, pictures and the measured memory next to the plan.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from ..atomic import write_json_atomic
from . import adapter_io
from ..base import embedded
from . import report
from ..method.budget import mib
from ..method.config import steps_of
from .data import BatchStream, evaluate
from .records import TaskData, load_task_data
from ..errors import Interrupted, OutOfMemory, RunDirError, TrainingDiverged
from ..base.footprint import current_rss_bytes, fmt_mib, measured_peak, release_free_heap
from ..base.models import ArchSpec, head_params, load_base_model, target_paths
from .recipe import Recipe, dump_recipe, recipe_from_dict, read_yaml
from .run_lock import LOCK_NAME, RunLock
from . import distributed
from .distributed import GradientAverager, Processes
from .plan import EVAL_BATCH_FACTOR, MemoryPlan, memory_plan, resolve_device
from .training import TrainState, prepare_training, train_step


def _is_oom(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text


def _loss(model, batch):
    return model(**batch).loss


class _StopFlag:
    """Turns the first Ctrl-C (or SIGTERM: a scheduler's preemption, torchrun stopping its workers) into "stop
    after this step and checkpoint"; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.stop = False
        self._first = 0.0

    def __enter__(self):
        self._old = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        # A second signal within a second is the same stop passed on (torchrun forwards the terminal's Ctrl-C to
        # workers that already got it); a second Ctrl-C after that aborts without a checkpoint.
        if self.stop and signum == signal.SIGINT and time.monotonic() - self._first > 1.0:
            raise KeyboardInterrupt
        if not self.stop:
            self.stop, self._first = True, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_resumable(run_dir: Path) -> None:
    if not (run_dir / "recipe.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a qelalora run directory (no recipe.yaml); cannot resume")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check (resume) or empty (new run) a run folder that this process holds the lock of."""
    if resume:
        _check_resumable(run_dir)
        return
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.exists() else []
    if entries:
        if not overwrite:
            raise RunDirError(f"{run_dir} already exists and is not empty; pass --overwrite to replace it, or choose another --run-dir")
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint we continue from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


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


def _memory_line(fp, measured: int, device: str) -> str:
    """Predicted beside measured, like for like: CUDA counts tensors; a CPU process also holds code and heap."""
    if device.startswith("cuda") or fp.process_bytes is None:
        return f"memory: predicted {fmt_mib(fp.total_bytes)}, measured {fmt_mib(measured)} (CUDA max allocated)"
    return (f"memory: predicted {fmt_mib(fp.process_bytes)} for the process ({fmt_mib(fp.total_bytes)} of tensors), "
            f"measured {fmt_mib(measured)} (peak RSS above the RSS before planning and loading)")


def _save_outputs(run: Run, run_dir: Path, started: float, metrics: dict, baseline_rss: int, loop: dict) -> dict:
    state, recipe = run.state, run.recipe
    names = {id(p): n for n, p in run.model.named_parameters()}
    heads = {names[id(p)]: p for p in state.head_params}
    adapter_io.save_adapter(run_dir / "adapter", state.layers, heads, recipe.model.name, recipe.model.quantize, run.spec.task,
                            recipe.model.num_labels if run.spec.task == "seq-cls" else None, run.data.label_names)
    adapter_io.save_peft_lora(run_dir / "peft", state.layers, heads, embedded.loadable_name(recipe.model.name), run.spec.task,
                              run.spec.heads)
    history = report.write_rank_pattern(run_dir, state.ranks)
    report.plot_ranks(history, run_dir)
    measured = measured_peak(run.device, baseline_rss)
    memory = {**run.plan.to_dict(), **measured, "adapter_bytes_final": state.ranks.adapter_bytes()}
    write_json_atomic(run_dir / "memory.json", memory)
    summary = {
        "steps": state.step,
        "seconds": round(time.time() - started, 1),
        "metrics": metrics,
        "total_rank": {"initial": history["total_rank"]["initial"], "final": history["total_rank"]["final"]},
        "adapter_bytes_final": state.ranks.adapter_bytes(),
        "budget_bytes": state.ranks.budget_bytes,
        "measured_training_bytes": measured["measured_training_bytes"],
        "rank_rounds": len(history["rounds"]),
        "train_loop": loop,  # this session's training steps alone (no loading, no evaluation)
    }
    write_json_atomic(run_dir / "report.json", summary)
    return summary


def _silent(*args, **kwargs) -> None:
    pass


def run_train(recipe: Recipe | None, run_dir: Path, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or continue) a run; returns the final summary. Only one process at a time trains into a folder.

    Under `torchrun`, every process trains its shard and the main one alone
    holds the folder's lock, writes, logs and evaluates (run/distributed.py).
    """
    procs = distributed.from_environment()
    if not procs.main:
        log, progress = _silent, False
    if resume:
        _check_resumable(run_dir)  # before the lock, which would create a missing folder
        recipe = recipe_from_dict(read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    device = distributed.start(procs, resolve_device(recipe.train.device))
    created = not run_dir.exists()
    try:
        with contextlib.ExitStack() as held:
            def claim() -> None:
                held.enter_context(RunLock(run_dir))
                prepare_run_dir(run_dir, resume, overwrite)

            distributed.from_main(procs, claim)
            return _train(recipe, run_dir, resume, progress, log, procs, device)
    except BaseException:
        if procs.main and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that stopped before writing anything (bad data, say) leaves no empty folder
        raise
    finally:
        distributed.finish()


def _resume_point(run_dir: Path, log) -> Path:
    good = ckpt.latest_good_checkpoint(run_dir, warn=log)
    if good is None:
        raise RunDirError(f"{run_dir} has no intact checkpoint to resume from; start a new run instead")
    return good


def _train(recipe: Recipe, run_dir: Path, resume: bool, progress: bool, log, procs: Processes, device: str) -> dict:
    started = time.time()
    baseline_rss = current_rss_bytes()
    run = build_run(recipe, log, procs, device)
    state, t = run.state, recipe.train
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        good = distributed.from_main(procs, lambda: _resume_point(run_dir, log))
        meta = ckpt.load_checkpoint(good, state, procs.rank)
        if not meta["rng_restored"]:
            distributed.seed_process(procs, t.seed, state.step)
        run.stream.load_state_dict(meta["data"])
        started -= meta.get("elapsed", 0.0)
        if procs.main:
            _truncate_metrics(metrics_path, state.step)
        log(f"resumed from {good.name} (step {state.step} of {t.steps})")
        if meta.get("processes", 1) != procs.world:
            log(f"note: the checkpoint was written by {meta.get('processes', 1)} process(es) and the run continues with "
                f"{procs.world}: the data order, ranks and optimiser carry on; the global batch is now "
                f"{procs.world} x {t.batch_size}")
    elif procs.main:
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        write_json_atomic(run_dir / "memory_plan.json", run.plan.to_dict())

    def save_ckpt():
        rng = distributed.rng_states(procs, run.device)  # every process's dropout state, for an exact resume
        extra = {"data": run.stream.state_dict(), "elapsed": time.time() - started}
        distributed.from_main(procs, lambda: ckpt.save_checkpoint(run_dir, state, extra, rng, t.keep_checkpoints))

    budget_mb = mib(state.ranks.budget_bytes)
    bar = tqdm(total=t.steps, initial=state.step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    loop_started, first_step = time.perf_counter(), state.step
    averager = state.after_backward if isinstance(state.after_backward, GradientAverager) else None
    with _StopFlag() as flag:
        while state.step < t.steps:
            batch = {k: v.to(run.device) for k, v in next(run.stream).items()}
            if averager is not None:
                averager.stop_requested = flag.stop  # carried by the gradient all-reduce: all processes stop together
            try:
                loss = train_step(state, batch, _loss)
            except (MemoryError, RuntimeError) as err:
                if not isinstance(err, MemoryError) and not _is_oom(err):
                    raise
                last = ckpt.latest_good_checkpoint(run_dir, warn=log)
                raise OutOfMemory(
                    f"step {state.step + 1} ran out of memory ({str(err).splitlines()[0][:160]}). Lower train.batch_size "
                    f"(now {t.batch_size}) or data.max_length (now {recipe.data.max_length}), or the budget; "
                    + (f"--resume {run_dir} continues from {last.name}" if last else "no checkpoint had been written yet")
                ) from None
            if not math.isfinite(loss):
                last = ckpt.latest_good_checkpoint(run_dir, warn=log)
                where = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
                raise TrainingDiverged(
                    f"the loss became {loss} at step {state.step}; training stopped and {where}. "
                    "Lower train.lr (or raise warmup) and start again, or --resume to retry from the checkpoint."
                )
            lr, used, rank = state.scheduler.get_last_lr()[0], state.ranks.adapter_bytes(), state.ranks.total_rank
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", rank=rank, mb=f"{mib(used):.1f}/{budget_mb:.0f}")
            if t.log_every and state.step % t.log_every == 0 and procs.main:
                _append_metrics(metrics_path, {"step": state.step, "loss": loss, "lr": lr, "total_rank": rank, "adapter_bytes": used})
            if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps and run.data.val and procs.main:
                val = evaluate(run.model, run.data.val, run.spec.task, EVAL_BATCH_FACTOR * t.batch_size, run.data.pad_id, run.device, t.eval_batches)
                _append_metrics(metrics_path, {"step": state.step, "val": val})
            if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or state.step == t.steps:
                save_ckpt()
            if (averager.stop if averager is not None else flag.stop):
                save_ckpt()
                bar.close()
                raise Interrupted(f"interrupted at step {state.step}; a checkpoint was saved. Continue with: qelalora train --resume {run_dir}")
    bar.close()
    loop = {"steps": state.step - first_step, "seconds": round(time.perf_counter() - loop_started, 2), "processes": procs.world}
    if not procs.main:
        return {"steps": state.step}
    held_out = {name: evaluate(run.model, part, run.spec.task, EVAL_BATCH_FACTOR * t.batch_size, run.data.pad_id, run.device)
                for name, part in (("val", run.data.val), ("test", run.data.test)) if part}  # a split may be empty
    _append_metrics(metrics_path, {"step": state.step, **held_out})
    summary = _save_outputs(run, run_dir, started, held_out, baseline_rss, loop)
    scores = "; ".join(f"{name} {value}" for name, value in held_out.items()) or "no held-out split to evaluate"
    log(
        f"done: {run_dir} ({summary['seconds']:.0f} s); {scores}\n"
        + _memory_line(run.plan.footprint, summary["measured_training_bytes"], run.device)
    )
    return summary
