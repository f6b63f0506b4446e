"""Several processes (gloo, CPU) train as one: same adapters everywhere, N x b = 1 x Nb, rounds compared, exact resume."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests import dist_worker
from tests.cli_helpers import write_cls_data, write_recipe
from tests.test_resume import _same_adapters, _wait_for_checkpoint

STEPS = 24


@pytest.fixture
def no_dropout_bert(tiny_bert_dir, tmp_path):
    """The tiny BERT with dropout off, so that one process at batch 2b and two at b see the same function."""
    folder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _recipe(tmp_path, model, batch, name="r.yaml", **train):
    return write_recipe(
        tmp_path / name, model, write_cls_data(tmp_path / "d.jsonl"),
        train={"steps": STEPS, "batch_size": batch, "checkpoint_every": 4, "log_every": 1, **train},
        elalora={"budget_mb": 0.3, "t_init": 4, "t_final": 8, "delta": 3, "b0": 3},
    )


def _spawn(recipe, out: Path, world: int, perturb=False) -> list[dict]:
    """Start `world` training processes. As under torchrun, this (the launching) process hosts the rendezvous
    store, so no worker serves the others' connections while it shuts down."""
    out.mkdir()
    if world == 1:
        dist_worker.train(0, 1, 0, str(recipe), str(out), STEPS)
    else:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        mp.spawn(dist_worker.train, args=(world, store.port, str(recipe), str(out), STEPS, perturb), nprocs=world)
    return [json.loads((out / f"process-{k}.json").read_text()) for k in range(world)]


@pytest.mark.slow
def test_two_processes_match_one_at_twice_the_batch(tmp_path, no_dropout_bert):
    two = _spawn(_recipe(tmp_path, no_dropout_bert, 4), tmp_path / "two", 2)
    one = _spawn(_recipe(tmp_path, no_dropout_bert, 8, name="r8.yaml"), tmp_path / "one", 1)
    assert all("error" not in r for r in two + one), two + one
    assert two[0]["rounds"] >= 2  # rank rounds happened, and resized the adapters identically everywhere
    assert two[0]["ranks"] == two[1]["ranks"] == one[0]["ranks"]
    assert len(set(two[0]["ranks"].values())) > 1  # the rounds moved rank between layers
    a, b = load_file(tmp_path / "two" / "process-0.safetensors"), load_file(tmp_path / "two" / "process-1.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on both processes
    ref = load_file(tmp_path / "one" / "process-0.safetensors")
    worst = max((a[k] - ref[k]).abs().max().item() for k in ref if ref[k].numel())
    print(f"largest difference, 2 processes x 4 against 1 x 8: {worst:.2e}")
    assert worst < 1e-5, worst
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], abs=1e-5)  # the logged loss is the global batch's


@pytest.mark.slow
def test_a_round_that_differs_on_one_process_stops_every_process(tmp_path, no_dropout_bert):
    results = _spawn(_recipe(tmp_path, no_dropout_bert, 4), tmp_path / "bad", 2, perturb=True)  # first round: step 7
    for r in results:
        assert r.get("error", "").startswith("ProcessesDiverged: the rank round at step 7 differs between processes"), r


def _torchrun(*args, nproc=2) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "qelalora",
               "train", "--no-progress", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def _finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_torchrun_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_bert_dir):
    """Dropout on: every process's random stream is checkpointed, so the resumed run is exact."""
    recipe = str(_recipe(tmp_path, tiny_bert_dir, 4))
    whole = subprocess.run([sys.executable, "-m", "qelalora", "train", "-r", recipe, "-o", str(tmp_path / "whole"),
                            "--nproc", "2", "--no-progress"], capture_output=True, text=True, timeout=400,
                           env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "2 processes: each holds the base and the adapters" in whole.stdout
    assert whole.stdout.count("done: ") == 1  # one process reports
    plan = json.loads((tmp_path / "whole" / "memory_plan.json").read_text())
    assert plan["processes"] == 2

    victim = _torchrun("-r", recipe, "-o", str(tmp_path / "killed"))
    _wait_for_checkpoint(tmp_path / "killed", 8, victim)
    import os

    os.killpg(victim.pid, signal.SIGKILL)  # the agent and both workers at once, as a lost machine would
    victim.wait()
    steps_done = int(sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    assert steps_done < STEPS
    out = _finish(_torchrun("--resume", str(tmp_path / "killed")))
    assert "resumed from step-" in out
    _same_adapters(tmp_path / "whole", tmp_path / "killed")
    whole_report = json.loads((tmp_path / "whole" / "report.json").read_text())
    killed_report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert whole_report["metrics"] == killed_report["metrics"]


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(tmp_path, tiny_bert_dir):
    recipe = str(_recipe(tmp_path, tiny_bert_dir, 4, steps=16))
    _finish(_torchrun("-r", recipe, "-o", str(tmp_path / "run")))
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert json.loads((ckpt / "state.json").read_text())["processes"] == 2
    shutil.rmtree(ckpt)  # back to step 12: finish the last 4 steps in one process
    (tmp_path / "run" / "report.json").unlink()
    done = subprocess.run([sys.executable, "-m", "qelalora", "train", "--resume", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "written by 2 process(es) and the run continues with 1" in done.stdout
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 16


def test_several_processes_need_a_named_run_folder(monkeypatch, capsys):
    from tests.cli_helpers import run_cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(capsys, "train", "--steps", "1")
    assert code == 2 and "name the run folder with -o" in err
