"""Training in several processes started by `torchrun` (or `accelerate launch`), with PyTorch's own distributed package.

Every process holds the whole model and its adapters (the budget applies per
process) and trains on its own shard of each global batch. After backward, one
flat all-reduce of the trainable tensors (adapters and heads) averages the
gradients, weighted by how many loss terms each shard had (tokens for a causal
LM), so that N processes at batch b step exactly as one process at batch N x b.
The same reduction carries the loss for the log and a "stop" flag, so a Ctrl-C
or SIGTERM seen by any process stops all of them after the same step.

Why not DistributedDataParallel: a rank round replaces adapter parameters with
tensors of new shapes, and DDP's gradient buckets are built for the shapes it
saw when it wrapped the model, so it would have to be rebuilt after every
round. The trainable set is small (MiBs against the frozen base's hundreds),
so a single flattened all-reduce per step costs little, works for any shapes,
and leaves one code path for the loop. Importance scores are then computed
from identical, averaged gradients, so every process makes the same round; a
hash of the rank pattern is compared across processes after each round, and
a difference stops the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from qelalora.errors import UserError

T = TypeVar("T")


class ProcessesDiverged(UserError):
    """Processes of one run made different rank rounds (their states were not identical)."""

    exit_code = 7


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment() -> Processes:
    """The layout `torchrun` describes in WORLD_SIZE / RANK / LOCAL_RANK (one process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    return Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(procs: Processes, device: str) -> str:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this process's device."""
    if not procs.active:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class MainProcessFailed(UserError):
    """The main process failed at a step the others wait for; its own message says why."""


def from_main(procs: Processes, action: Callable[[], T]) -> T:
    """Run `action` on the main process only and give its result, or its failure, to every process (so that a
    failure there never leaves the others waiting in a collective)."""
    if not procs.active:
        return action()
    box: list = [None]
    failure: BaseException | None = None
    if procs.main:
        try:
            box[0] = ("ok", action())
        except UserError as err:
            box[0], failure = ("error", err), err
        except BaseException as err:  # re-raised below, after the others have been told
            box[0], failure = ("error", MainProcessFailed(f"the main process failed: {type(err).__name__}: {err}")), err
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise failure if failure is not None else value
    return value


def loss_terms(batch: dict, task: str) -> int:
    """How many terms the batch's mean loss averages: examples (classification) or predicted tokens (causal LM)."""
    labels = batch["labels"]
    return int(labels.numel()) if task == "seq-cls" else int((labels[:, 1:] != -100).sum())


class GradientAverager:
    """Called after backward: averages the trainable gradients over processes, weighted by loss terms.

    Each process's gradient is d(mean loss of its shard) + d(regulariser); the
    reduction forms sum_k n_k g_k / sum_k n_k, the gradient of the mean over the
    global batch (the regulariser, identical everywhere, passes through
    unchanged). Returns the global batch's loss; `stop` becomes true on every
    process when any of them asked to stop.
    """

    def __init__(self, task: str):
        self.task = task
        self.stop_requested = False
        self.stop = False

    def __call__(self, params: Sequence[nn.Parameter], batch: dict, loss: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        n = float(loss_terms(batch, self.task))
        device = grads[0].device if grads else batch["labels"].device
        # a shard with no loss terms (every label ignored) has a NaN mean loss: it contributes nothing
        tail = torch.tensor([loss * n if n else 0.0, n, float(self.stop_requested)], dtype=torch.float32, device=device)
        flat = torch.cat([g.reshape(-1).float() * n if n else torch.zeros(g.numel(), device=device) for g in grads] + [tail])
        dist.all_reduce(flat)
        total = flat[-2]
        offset = 0
        for g in grads:
            g.copy_((flat[offset : offset + g.numel()] / total).view_as(g))
            offset += g.numel()
        self.stop = bool(flat[-1] > 0)
        return float(flat[-3] / total)


def check_round(procs: Processes, step: int, ranks: dict[str, int]) -> None:
    """Stop every process with a clear error if their rank patterns after a round differ."""
    digest = hashlib.sha256(json.dumps(ranks, sort_keys=True).encode()).digest()
    mine = torch.tensor(list(digest[:8]), dtype=torch.int64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(procs.world)]
    dist.all_gather(everyone, mine)
    differ = [k for k, other in enumerate(everyone) if not torch.equal(other, everyone[0])]
    if differ:
        raise ProcessesDiverged(
            f"the rank round at step {step} differs between processes (processes {differ} disagree with process 0); "
            "their states should be identical. This points to nondeterminism in the run (a different data shard "
            "leaking into the scores, or a bug): resume from the last checkpoint, and report it if it repeats"
        )


def broadcast_params(params: Sequence[torch.Tensor]) -> None:
    """Give every process the main process's values (freshly initialised heads may differ otherwise)."""
    for p in params:
        dist.broadcast(p.data, src=0)


def rng_states(procs: Processes, device: str) -> list[dict[str, torch.Tensor]]:
    """Every process's random-number state (dropout), gathered on all of them; for the main one's checkpoint.
    The CUDA state only when training on CUDA (reading it would open a CUDA context on a CPU run)."""
    mine = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        mine["cuda"] = torch.cuda.get_rng_state()
    if not procs.active:
        return [mine]
    everyone: list = [None] * procs.world
    dist.all_gather_object(everyone, mine)
    return everyone


def seed_process(procs: Processes, seed: int, step: int = 0) -> None:
    """A dropout stream of its own for every process but the main one (which keeps the one-process stream)."""
    if procs.rank > 0:
        torch.manual_seed(seed * 1_000_003 + 7919 * step + procs.rank)


SHUTDOWN_TIMEOUT_S = 600


def relaunch(nproc: int, train_args: list[str], progress: bool) -> None:
    """`qelalora train --nproc N`: run `qelalora train ARGS` under torchrun with N processes on this machine, and
    exit with its code."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--nproc starts torchrun itself; under torchrun, leave it out")
    # --shutdown-timeout: after Ctrl-C or SIGTERM, workers finish the step and write a checkpoint before torchrun
    # would SIGKILL them (its default is 30 s)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
               "-m", "qelalora", "train", *train_args, *([] if progress else ["--no-progress"])]
    child = subprocess.Popen(command)
    # Ctrl-C from the terminal reaches the workers themselves; a SIGTERM sent to this process is passed on.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(code)
