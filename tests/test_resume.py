"""A run killed at any moment and resumed ends exactly where an uninterrupted one does."""

import json
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import cli_process, write_cls_data, write_recipe

STEPS = 60


def _recipe(tmp_path, tiny_bert_dir, **method):
    return str(
        write_recipe(
            tmp_path / "r.yaml",
            tiny_bert_dir,
            write_cls_data(tmp_path / "d.jsonl"),
            train={"steps": STEPS, "checkpoint_every": 4, "log_every": 1},
            elalora={"budget_mb": 0.3, "t_init": 5, "t_final": 10, "delta": 3, "b0": 3, **method},
        )
    )


def _wait_for_checkpoint(run, min_step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
        if ckpts and int(ckpts[-1].name.split("-")[1]) >= min_step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise TimeoutError("no checkpoint appeared")


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _same_adapters(a, b):
    ta, tb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# the shipped defaults, and a run with every other start-up option (residual start, rsLoRA scaling, per-triplet
# scores, E and B learning-rate multipliers, a decaying squared regulariser)
OTHER_SETTINGS = {"init": "residual", "scaling": "sqrt-rank", "score_state": "triplet", "lr_mult_E": 8.0, "lr_mult_B": 2.0,
                  "regulariser": "squared", "gamma_decay": "linear", "gamma": 0.05}


@pytest.mark.parametrize("method", [{}, OTHER_SETTINGS], ids=["shipped-default", "other-settings"])
def test_sigkill_then_resume_is_bit_for_bit(method, tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir, **method)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    reference = cli_process("train", "-r", recipe, "-o", str(ref), "--no-progress")
    code, out = _finish(reference)
    assert code == 0, out

    victim = cli_process("train", "-r", recipe, "-o", str(killed), "--no-progress")
    _wait_for_checkpoint(killed, 20, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "report.json").exists()
    code, out = _finish(cli_process("train", "--resume", str(killed), "--no-progress"))
    assert code == 0, out
    assert "resumed from step-" in out
    _same_adapters(ref, killed)
    ranks = [json.loads((d / "rank_pattern.json").read_text()) for d in (ref, killed)]
    assert ranks[0] == ranks[1]
    # the metrics log has each step once, as if never interrupted
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert steps == list(range(1, STEPS + 1))


def test_ctrl_c_checkpoints_and_damaged_checkpoint_falls_back(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    run = tmp_path / "run"
    proc = cli_process("train", "-r", recipe, "-o", str(run), "--no-progress")
    _wait_for_checkpoint(run, 8, proc)
    proc.send_signal(signal.SIGINT)
    code, out = _finish(proc)
    assert code == 130 and "qelalora train --resume" in out and "Traceback" not in out
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    newest = ckpts[-1]
    with open(newest / "tensors.safetensors", "r+b") as f:  # damage the newest checkpoint
        f.truncate(100)
    code, out = _finish(cli_process("train", "--resume", str(run), "--no-progress"))
    assert code == 0, out
    assert f"checkpoint {newest.name} is damaged" in out and f"resumed from {ckpts[-2].name}" in out
    assert json.loads((run / "report.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_ten_sigkills_at_random_moments(tmp_path, tiny_bert_dir):
    """SIGKILL at random moments (three of them aimed at a checkpoint being written); every trial ends equal."""
    from qelalora.run.train.checkpoint import list_checkpoints, verify

    recipe = str(write_recipe(
        tmp_path / "r.yaml", tiny_bert_dir, write_cls_data(tmp_path / "d.jsonl"),
        train={"steps": 30, "checkpoint_every": 1, "log_every": 1, "keep_checkpoints": 3},
        elalora={"budget_mb": 0.3, "t_init": 3, "t_final": 6, "delta": 2, "b0": 3},
    ))
    ref = tmp_path / "ref"
    assert _finish(cli_process("train", "-r", recipe, "-o", str(ref), "--no-progress"))[0] == 0
    rng = random.Random(2026)
    caught_writing = 0
    for trial in range(10):
        run = tmp_path / f"trial{trial}"
        proc = cli_process("train", "-r", recipe, "-o", str(run), "--no-progress")
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if trial < 3:  # aim at a checkpoint write: kill as soon as a partial folder shows up
            while proc.poll() is None and not list((run / "checkpoints").glob(".partial-*")) and time.time() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        caught_writing += bool(list((run / "checkpoints").glob(".partial-*")))
        for c in list_checkpoints(run):
            assert verify(c) is None, (trial, c.name)  # no finished-looking checkpoint is ever broken
        if list_checkpoints(run):
            code, out = _finish(cli_process("train", "--resume", str(run), "--no-progress"))
        else:  # killed before the first checkpoint: nothing to resume, start again
            code, out = _finish(cli_process("train", "-r", recipe, "-o", str(run), "--overwrite", "--no-progress"))
        assert code == 0, (trial, out)
        _same_adapters(ref, run)
    assert caught_writing >= 1
