"""Checkpoints that survive being killed at any moment, and that hold no pickle.

A checkpoint is a folder named by its step (`RunFolder.checkpoint(step)`) with
- CHECKPOINT_TENSORS (safetensors): adapters (current shapes), heads, score EMAs,
  optimiser moments, RNG states;
- CHECKPOINT_STATE (JSON): step, scheduler, optimiser hyper-parameters and scalars,
  allocator history, data position;
- CHECKPOINT_MANIFEST (JSON): SHA-256 of both files, written last.
It is written under a temporary name, fsynced, then renamed, so a folder with
the final name is complete; an old one is renamed away before it is deleted,
so a kill during the deletion never leaves a half-deleted folder behind; a
folder whose checksums do not match is skipped (with a message) in favour of
the previous good one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qelalora.errors import UserError
from qelalora.method.layer import ADAPTER_TENSORS

from ..folder.layout import (CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX, CHECKPOINT_STATE, CHECKPOINT_TENSORS, RunFolder,
                             read_json, write_json_atomic)
from .step import TrainState


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, folder not writable); earlier ones are untouched."""

    exit_code = 5


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _param_names(state: TrainState) -> list[str]:
    names = {id(p): n for n, p in state.model.named_parameters()}
    return [names[id(p)] for p in state.trainable_params()]


def _rng_prefix(process: int) -> str:
    return "rng" if process == 0 else f"rng/process-{process}"


def collect(state: TrainState, extra: dict, rng: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything needed to continue `state` exactly: (tensors, JSON-able state).

    `rng` holds every process's random-number states (`distributed.rng_states`;
    one entry for a single process).
    """
    tensors: dict[str, torch.Tensor] = {}
    params = state.trainable_params()
    names = _param_names(state)
    for name, p in zip(names, params):
        tensors[f"param/{name}"] = p.detach()
    for lname, layer in state.layers.items():
        for t in ADAPTER_TENSORS:
            for kind, buf in zip(("ibar", "ubar"), layer.score_buffers(t)):
                tensors[f"score/{lname}.{t}.{kind}"] = buf
    opt_state = state.optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    for process, states in enumerate(rng):
        for kind, value in states.items():
            tensors[f"{_rng_prefix(process)}/{kind}"] = value
    tensors["rng/ranks"] = state.ranks.generator.get_state()
    ranks_state = state.ranks.state_dict()
    del ranks_state["generator"]
    meta = {
        "step": state.step,
        "param_names": names,
        "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
        "scheduler": state.scheduler.state_dict(),
        "ranks": ranks_state,
        "processes": len(rng),
        **extra,
    }
    # clone: safetensors refuses tensors that share memory (e.g. an 8-bit optimiser's shared maps)
    return {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, meta


def save_checkpoint(run_dir: Path, state: TrainState, extra: dict, rng: list[dict], keep: int = 2) -> Path:
    """Write the checkpoint of `state.step`, then keep the `keep` newest up to it.

    Checkpoints of later steps belong to a timeline the run resumed away from (a resume starts from the newest
    intact one, so any later one was damaged) and are removed. A checkpoint of the same step (a stop that lands
    on a checkpoint step saves twice) is replaced only once the new one is in place.
    """
    final = RunFolder(run_dir).checkpoint(state.step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".partial-{final.name}"
    for stale in [*root.glob(f".partial-{CHECKPOINT_PREFIX}*"), *root.glob(f".discarded-{CHECKPOINT_PREFIX}*")]:  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    replaced = None
    try:
        tensors, meta = collect(state, extra, rng)
        save_file(tensors, tmp / CHECKPOINT_TENSORS)
        write_json_atomic(tmp / CHECKPOINT_STATE, meta)
        _fsync(tmp / CHECKPOINT_TENSORS)
        write_json_atomic(tmp / CHECKPOINT_MANIFEST, {"step": state.step, **{name: _sha256(tmp / name) for name in
                                                                            (CHECKPOINT_TENSORS, CHECKPOINT_STATE)}})
        if final.exists():
            replaced = _rename_away(final)
        os.replace(tmp, final)
        _fsync(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced is not None and not final.exists():
            os.replace(replaced, final)  # the new one could not take its place: the old one goes back
        previous = [p.name for p in list_checkpoints(run_dir)]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final.name} ({err.strerror or err}); {kept}") from err
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    existing = list_checkpoints(run_dir)
    later = [c for c in existing if c.name > final.name]
    earlier = [c for c in existing if c.name < final.name]
    for old in later + earlier[: max(0, len(earlier) - (keep - 1))]:
        try:
            shutil.rmtree(_rename_away(old), ignore_errors=True)
        except OSError:  # an old checkpoint that cannot be removed costs disk space, not the run
            continue
    return final


def _rename_away(checkpoint: Path) -> Path:
    """Move a checkpoint folder out of the checkpoints' names in one atomic rename (so that deleting it, which a
    kill may interrupt, can never leave a damaged `step-*` folder); returns where it went."""
    doomed = checkpoint.with_name(f".discarded-{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    return doomed


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = RunFolder(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it."""
    try:
        manifest = read_json(path / CHECKPOINT_MANIFEST)
    except (OSError, ValueError):
        return "its manifest is missing or unreadable"
    for name in (CHECKPOINT_TENSORS, CHECKPOINT_STATE):
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != manifest.get(name):
            return f"{name} does not match its checksum"
    return None


def latest_good_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint whose checksums match; broken ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"checkpoint {path.name} is damaged ({problem}); using the previous one")
    return None


def load_checkpoint(path: Path, state: TrainState, process: int = 0) -> dict:
    """Restore `state` in place from a checkpoint; returns its JSON state (for the caller's extras).

    Process `process` of several takes its own random-number states; its
    `rng_restored` is false when the checkpoint has none for it (it was
    written by fewer processes), and the caller seeds it.
    """
    # clone: fresh allocations are aligned as the originals were; BLAS results can depend on alignment
    tensors = {k: v.clone() for k, v in load_file(path / CHECKPOINT_TENSORS).items()}
    meta = read_json(path / CHECKPOINT_STATE)
    params = state.trainable_params()
    if meta["param_names"] != _param_names(state):
        raise ValueError("the checkpoint was made for a different set of trainable tensors")
    for name, p in zip(meta["param_names"], params):
        p.data = tensors[f"param/{name}"].to(p.device)
        p.grad = None
    for lname, layer in state.layers.items():
        for t in ADAPTER_TENSORS:
            for kind in ("ibar", "ubar"):
                setattr(layer, f"{t}_{kind}", tensors[f"score/{lname}.{t}.{kind}"].to(layer.lora_A.device))
    opt_state: dict = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["optimizer"]["scalars"].items():
        opt_state["state"].setdefault(int(idx), {}).update(scalars)
    state.optimizer.load_state_dict(opt_state)
    state.scheduler.load_state_dict(meta["scheduler"])
    state.ranks.load_state_dict({**meta["ranks"], "generator": tensors["rng/ranks"]})
    prefix = _rng_prefix(process)
    meta["rng_restored"] = f"{prefix}/torch" in tensors
    if meta["rng_restored"]:
        torch.set_rng_state(tensors[f"{prefix}/torch"])
    if f"{prefix}/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{prefix}/cuda"])
    state.step = meta["step"]
    return meta
