"""`qelalora train`: a recipe in, a run folder out.

The flow is the one in the design: recipe -> memory plan -> NF4 model with
ElaLoRA layers (`build`) -> the loop (steps, metrics, checkpoints) -> the run
folder with adapters, rank pattern, pictures and the measured memory next to
the plan (`qelalora.run.folder`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from qelalora.base import embedded
from qelalora.base.footprint import current_rss_bytes, measured_peak
from qelalora.errors import Interrupted, OutOfMemory, RunDirError, TrainingDiverged
from qelalora.units import fmt_mib, mib

from ..folder import adapter_io, report
from ..folder.layout import RunFolder, write_json_atomic
from ..folder.run_lock import RunLock
from ..plan.memory_plan import EVAL_BATCH_FACTOR, resolve_device
from ..recipe import Recipe, dump_recipe, read_yaml, recipe_from_dict
from . import checkpoint as ckpt
from . import distributed
from .build import Run, build_run
from .distributed import GradientAverager, Processes
from .evaluate import evaluate
from .step import model_loss, train_step


def _is_oom(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text


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


def _memory_line(fp, measured: int, device: str) -> str:
    """Predicted beside measured, like for like: CUDA counts tensors; a CPU process also holds code and heap."""
    if device.startswith("cuda") or fp.process_bytes is None:
        return f"memory: predicted {fmt_mib(fp.total_bytes)}, measured {fmt_mib(measured)} (CUDA max allocated)"
    return (f"memory: predicted {fmt_mib(fp.process_bytes)} for the process ({fmt_mib(fp.total_bytes)} of tensors), "
            f"measured {fmt_mib(measured)} (peak RSS above the RSS before planning and loading)")


def _silent(*args, **kwargs) -> None:
    pass


def run_train(recipe: Recipe | None, run_dir: Path, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or continue) a run; returns the final summary. Only one process at a time trains into a folder.

    Under `torchrun`, every process trains its shard and the main one alone
    holds the folder's lock, writes, logs and evaluates (run/train/distributed.py).
    """
    procs = distributed.from_environment()
    if not procs.main:
        log, progress = _silent, False
    folder = RunFolder(run_dir)
    if resume:
        folder.require_resumable()  # before the lock, which would create a missing folder
        recipe = recipe_from_dict(read_yaml(folder.recipe), str(folder.recipe))
    device = distributed.start(procs, resolve_device(recipe.train.device))
    created = not run_dir.exists()
    try:
        with contextlib.ExitStack() as held:
            def claim() -> None:
                held.enter_context(RunLock(run_dir))
                folder.prepare(resume, overwrite)

            distributed.from_main(procs, claim)
            return _train(recipe, folder, resume, progress, log, procs, device)
    except BaseException:
        if procs.main and created:
            folder.remove_if_empty()
        raise
    finally:
        distributed.finish()


def _train(recipe: Recipe, folder: RunFolder, resume: bool, progress: bool, log, procs: Processes, device: str) -> dict:
    """Build, start or resume, run the steps, then (main process) evaluate and write the outputs."""
    started, baseline_rss = time.time(), current_rss_bytes()
    session = _Session(build_run(recipe, log, procs, device), folder, procs, log, started, baseline_rss)
    if resume:
        session.resume()
    else:
        session.start()
    loop = session.train_steps(progress)
    if not procs.main:
        return {"steps": session.run.state.step}
    return session.finish(loop)


@dataclass
class _Session:
    """One process's training session in a run folder: a fresh start, or a resume from its last checkpoint."""

    run: Run
    folder: RunFolder
    procs: Processes
    log: Callable[..., None]
    started: float  # wall clock of the run's start (earlier sessions' time taken off on resume)
    baseline_rss: int  # the RSS before planning and loading: measured memory counts above it

    def start(self) -> None:
        if self.procs.main:
            self.folder.recipe.write_text(dump_recipe(self.run.recipe))
            write_json_atomic(self.folder.memory_plan, self.run.plan.to_dict())

    def resume(self) -> None:
        state, t, procs = self.run.state, self.run.recipe.train, self.procs
        good = distributed.from_main(procs, self._resume_point)
        meta = ckpt.load_checkpoint(good, state, procs.rank)
        if not meta["rng_restored"]:
            distributed.seed_process(procs, t.seed, state.step)
        self.run.stream.load_state_dict(meta["data"])
        self.started -= meta.get("elapsed", 0.0)
        if procs.main:
            self.folder.truncate_metrics(state.step)
        self.log(f"resumed from {good.name} (step {state.step} of {t.steps})")
        if meta.get("processes", 1) != procs.world:
            self.log(f"note: the checkpoint was written by {meta.get('processes', 1)} process(es) and the run continues "
                     f"with {procs.world}: the data order, ranks and optimiser carry on; the global batch is now "
                     f"{procs.world} x {t.batch_size}")

    def _resume_point(self) -> Path:
        good = ckpt.latest_good_checkpoint(self.folder.path, warn=self.log)
        if good is None:
            raise RunDirError(f"{self.folder.path} has no intact checkpoint to resume from; start a new run instead")
        return good

    def save_checkpoint(self) -> None:
        run, procs = self.run, self.procs
        rng = distributed.rng_states(procs, run.device)  # every process's dropout state, for an exact resume
        extra = {"data": run.stream.state_dict(), "elapsed": time.time() - self.started}
        distributed.from_main(procs, lambda: ckpt.save_checkpoint(self.folder.path, run.state, extra, rng,
                                                                  run.recipe.train.keep_checkpoints))

    def train_steps(self, progress: bool) -> dict:
        """Steps up to the recipe's last; a stop request (Ctrl-C, SIGTERM) checkpoints and raises Interrupted."""
        state, t = self.run.state, self.run.recipe.train
        bar = tqdm(total=t.steps, initial=state.step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
        loop_started, first_step = time.perf_counter(), state.step
        averager = state.after_backward if isinstance(state.after_backward, GradientAverager) else None
        with _StopFlag() as flag:
            while state.step < t.steps:
                batch = {k: v.to(self.run.device) for k, v in next(self.run.stream).items()}
                if averager is not None:
                    averager.stop_requested = flag.stop  # carried by the gradient all-reduce: all processes stop together
                loss = self._step(batch)
                self._after_step(loss, bar)
                if averager.stop if averager is not None else flag.stop:
                    self.save_checkpoint()
                    bar.close()
                    raise Interrupted(f"interrupted at step {state.step}; a checkpoint was saved. "
                                      f"Continue with: qelalora train --resume {self.folder.path}")
        bar.close()
        return {"steps": state.step - first_step, "seconds": round(time.perf_counter() - loop_started, 2),
                "processes": self.procs.world}  # this session's training steps alone (no loading, no evaluation)

    def _step(self, batch: dict) -> float:
        """One training step; running out of memory or a non-finite loss stops with what to do next."""
        run, state = self.run, self.run.state
        try:
            loss = train_step(state, batch, model_loss)
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and not _is_oom(err):
                raise
            last = ckpt.latest_good_checkpoint(self.folder.path, warn=self.log)
            raise OutOfMemory(
                f"step {state.step + 1} ran out of memory ({str(err).splitlines()[0][:160]}). Lower train.batch_size "
                f"(now {run.recipe.train.batch_size}) or data.max_length (now {run.recipe.data.max_length}), or the budget; "
                + (f"--resume {self.folder.path} continues from {last.name}" if last else "no checkpoint had been written yet")
            ) from None
        if not math.isfinite(loss):
            last = ckpt.latest_good_checkpoint(self.folder.path, warn=self.log)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            raise TrainingDiverged(
                f"the loss became {loss} at step {state.step}; training stopped and {where}. "
                "Lower train.lr (or raise warmup) and start again, or --resume to retry from the checkpoint."
            )
        return loss

    def _after_step(self, loss: float, bar) -> None:
        """Progress, the metrics log, validation and checkpoints when they are due."""
        run, state, t, main = self.run, self.run.state, self.run.recipe.train, self.procs.main
        lr, used, rank = state.scheduler.get_last_lr()[0], state.ranks.adapter_bytes(), state.ranks.total_rank
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", rank=rank, mb=f"{mib(used):.1f}/{mib(state.ranks.budget_bytes):.0f}")
        if t.log_every and state.step % t.log_every == 0 and main:
            self.folder.append_metrics({"step": state.step, "loss": loss, "lr": lr, "total_rank": rank, "adapter_bytes": used})
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps and run.data.val and main:
            val = evaluate(run.model, run.data.val, run.spec.task, EVAL_BATCH_FACTOR * t.batch_size, run.data.pad_id,
                           run.device, t.eval_batches)
            self.folder.append_metrics({"step": state.step, "val": val})
        if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or state.step == t.steps:
            self.save_checkpoint()

    def finish(self, loop: dict) -> dict:
        """The held-out scores, then the run folder's outputs; returns the summary."""
        run, t = self.run, self.run.recipe.train
        held_out = {name: evaluate(run.model, part, run.spec.task, EVAL_BATCH_FACTOR * t.batch_size, run.data.pad_id, run.device)
                    for name, part in (("val", run.data.val), ("test", run.data.test)) if part}  # a split may be empty
        self.folder.append_metrics({"step": run.state.step, **held_out})
        summary = self._write_outputs(held_out, loop)
        scores = "; ".join(f"{name} {value}" for name, value in held_out.items()) or "no held-out split to evaluate"
        self.log(f"done: {self.folder.path} ({summary['seconds']:.0f} s); {scores}\n"
                 + _memory_line(run.plan.footprint, summary["measured_training_bytes"], run.device))
        return summary

    def _write_outputs(self, metrics: dict, loop: dict) -> dict:
        run, folder = self.run, self.folder
        state, recipe = run.state, run.recipe
        names = {id(p): n for n, p in run.model.named_parameters()}
        heads = {names[id(p)]: p for p in state.head_params}
        adapter_io.save_adapter(folder.adapter, state.layers, heads, recipe.model.name, recipe.model.quantize, run.spec.task,
                                recipe.model.num_labels if run.spec.task == "seq-cls" else None, run.data.label_names)
        adapter_io.save_peft_lora(folder.peft, state.layers, heads, embedded.loadable_name(recipe.model.name), run.spec.task,
                                  run.spec.heads)
        history = report.write_rank_pattern(folder, state.ranks)
        report.plot_ranks(history, folder)
        measured = measured_peak(run.device, self.baseline_rss)
        write_json_atomic(folder.memory, {**run.plan.to_dict(), **measured, "adapter_bytes_final": state.ranks.adapter_bytes()})
        summary = {
            "steps": state.step,
            "seconds": round(time.time() - self.started, 1),
            "metrics": metrics,
            "total_rank": {"initial": history["total_rank"]["initial"], "final": history["total_rank"]["final"]},
            "adapter_bytes_final": state.ranks.adapter_bytes(),
            "budget_bytes": state.ranks.budget_bytes,
            "measured_training_bytes": measured["measured_training_bytes"],
            "rank_rounds": len(history["rounds"]),
            "train_loop": loop,  # this session's training steps alone (no loading, no evaluation)
        }
        write_json_atomic(folder.report, summary)
        return summary
