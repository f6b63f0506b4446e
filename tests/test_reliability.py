"""Faults and hostile input: disk full, unwritable folders, out of memory, fuzzed files, safe loading."""

import errno
import json
import string
from array import array
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qelalora.errors import UserError
from qelalora.run.recipe import recipe_from_dict
from qelalora.run.folder.layout import CHECKPOINT_TENSORS
from qelalora.run.train import checkpoint as ckpt
from tests.cli_helpers import run_cli, write_cls_data, write_recipe

FUZZ_CASES = {"recipe": 300, "recipe_text": 300, "data": 200, "metadata": 100, "chat": 100}


@pytest.fixture()
def bert_recipe(tmp_path, tiny_bert_dir):
    return str(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, write_cls_data(tmp_path / "d.jsonl"),
                            train={"steps": 12, "checkpoint_every": 2},
                            elalora={"budget_mb": 0.3, "t_init": 2, "t_final": 3, "delta": 2, "b0": 2}))


def test_disk_full_during_checkpoint_keeps_the_previous_one(capsys, tmp_path, bert_recipe, monkeypatch):
    calls = {"n": 0}
    real = ckpt.save_file

    def flaky(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint (step 6) hits a full disk half-way
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "-r", bert_recipe, "-o", str(run), "--no-progress")
    assert code == 5 and "could not write checkpoint step-00000006 (No space left on device)" in err
    assert "the previous checkpoint step-00000004 is intact" in err and "Traceback" not in err
    good = ckpt.latest_good_checkpoint(run)
    assert good.name == "step-00000004" and ckpt.verify(good) is None
    assert not list((run / "checkpoints").glob(".partial-*"))
    monkeypatch.setattr(ckpt, "save_file", real)
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err
    assert json.loads((run / "report.json").read_text())["steps"] == 12


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_killed_while_an_old_checkpoint_is_deleted_leaves_no_broken_one(tmp_path, bert_recipe, monkeypatch, capsys):
    """Rotation deletes the oldest checkpoint file by file; a kill half-way must not leave a damaged step-* folder."""
    import shutil

    real = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".discarded-") and path.exists():
            (path / CHECKPOINT_TENSORS).unlink()  # the first file is gone, then the process dies
            raise _Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        run_cli(capsys, "train", "-r", bert_recipe, "-o", str(run), "--no-progress")
    names = [c.name for c in ckpt.list_checkpoints(run)]
    assert names == ["step-00000004", "step-00000006"]  # keep 2: step 2 was being deleted when the kill came
    assert all(ckpt.verify(c) is None for c in ckpt.list_checkpoints(run))
    assert [p.name for p in (run / "checkpoints").glob(".discarded-*")] == [".discarded-step-00000002"]
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err
    assert "resumed from step-00000006" in out + err
    assert not list((run / "checkpoints").glob(".discarded-*"))  # the next checkpoint cleared what was left


class _Step:
    """What save_checkpoint reads of a training state, with `collect` stubbed out."""

    def __init__(self, step):
        self.step = step


@pytest.fixture
def light_checkpoints(monkeypatch):
    monkeypatch.setattr(ckpt, "collect", lambda state, extra, rng: ({"w": torch.full((4,), float(state.step))}, {"step": state.step}))
    return lambda run, step, keep: ckpt.save_checkpoint(run, _Step(step), {}, [], keep)


@pytest.mark.parametrize("keep, left", [(1, ["step-00000005"]), (2, ["step-00000004", "step-00000005"])])
def test_rotation_keeps_the_newest_up_to_the_step_written(tmp_path, light_checkpoints, keep, left):
    """After a resume from step 4 (step 6 was damaged), writing step 5 removes step 6 and never step 5 itself."""
    for step in (4, 6):
        light_checkpoints(tmp_path, step, 3)
    (tmp_path / "checkpoints" / "step-00000006" / CHECKPOINT_TENSORS).write_bytes(b"damaged")
    light_checkpoints(tmp_path, 5, keep)
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == left
    assert all(ckpt.verify(c) is None for c in ckpt.list_checkpoints(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == left  # nothing else left behind


def test_saving_a_step_again_replaces_it_only_once_the_new_one_is_in_place(tmp_path, light_checkpoints, monkeypatch):
    light_checkpoints(tmp_path, 4, 1)
    light_checkpoints(tmp_path, 4, 1)  # a stop on a checkpoint step saves twice
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == ["step-00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]
    real = ckpt.os.replace

    def failing_move(src, dst):
        if Path(src).name.startswith(".partial-"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_move)
    with pytest.raises(ckpt.CheckpointWriteError, match="the previous checkpoint step-00000004 is intact"):
        light_checkpoints(tmp_path, 4, 1)
    assert ckpt.verify(tmp_path / "checkpoints" / "step-00000004") is None  # the old one went back


def test_output_folder_not_writable(capsys, tmp_path, bert_recipe):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", "-r", bert_recipe, "-o", str(blocker / "run"))
    assert code == 5 and "check that the folder is writable" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_out_of_memory_gives_advice(capsys, tmp_path, bert_recipe, monkeypatch):
    from qelalora.run.train import loop

    real = loop.train_step

    def oom_at_five(state, batch, loss_fn):
        if state.step == 4:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 68719476736 bytes.")
        return real(state, batch, loss_fn)

    monkeypatch.setattr(loop, "train_step", oom_at_five)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "-r", bert_recipe, "-o", str(run), "--no-progress")
    assert code == 4 and "step 5 ran out of memory" in err and "Lower train.batch_size (now 8)" in err
    assert f"--resume {run} continues from step-00000004" in err
    assert ckpt.verify(ckpt.latest_good_checkpoint(run)) is None


# ---- fuzzing: every case ends in a clean error or a valid result, never another exception ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
section_keys = st.sampled_from(["model", "data", "train", "elalora", "description", "extra"])
field_keys = st.sampled_from(["name", "quantize", "steps", "lr", "batch_size", "budget_mb", "rank", "targets", "max_length",
                              "t_init", "t_final", "delta", "seed", "source", "num_labels", "k", "b0", "r_min", "bogus"])


@settings(max_examples=FUZZ_CASES["recipe"], deadline=None)
@given(st.dictionaries(section_keys, st.dictionaries(field_keys, json_values, max_size=6) | json_values, max_size=5))
def test_fuzzed_recipes_end_in_a_clear_error_or_a_valid_recipe(raw):
    try:
        recipe = recipe_from_dict(raw)
    except UserError as err:
        assert str(err)
        return
    assert recipe.train.steps >= 1 and recipe.elalora.budget_mb > 0


@settings(max_examples=FUZZ_CASES["recipe_text"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.integers(1, 3000).map(lambda n: "a: " * n + "1"),  # deeply nested mappings
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # deeply nested lists
    st.just("model: !!python/object/apply:os.system ['true']"),
    st.just("train: {steps: 1e999, lr: .nan}"),
))
def test_fuzzed_recipe_files(tmp_path, text):
    from qelalora.run.recipe import load_recipe

    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_recipe(str(path))
    except UserError:
        pass


class _SplitTokenizer:
    """A torch-free tokenizer stand-in: one id per character."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        texts = [text] if isinstance(text, str) else text
        ids = [[2 + (ord(c) % 50) for c in t][: max_length if truncation else None] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


@settings(max_examples=FUZZ_CASES["data"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([".jsonl", ".csv", ".txt"]), st.one_of(
    st.binary(max_size=300),
    st.lists(json_values, max_size=8).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
    st.lists(st.tuples(st.text(max_size=30), json_values), max_size=8).map(
        lambda rows: "\n".join(json.dumps({"text": t, "label": l}) for t, l in rows).encode()),
    st.lists(st.tuples(st.text(string.printable, max_size=20), st.text(max_size=4)), max_size=8).map(
        lambda rows: ("text,label\n" + "\n".join(f'"{t}",{l}' for t, l in rows)).encode("utf-8", "surrogatepass")),
), st.sampled_from(["seq-cls", "causal-lm"]))
def test_fuzzed_data_files(tmp_path, suffix, content, task):
    from qelalora.run.data.records import load_task_data
    from qelalora.run.recipe import DataSection

    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    try:
        data = load_task_data(DataSection(source=str(path), max_length=16, val_size=1, test_size=1), task, _SplitTokenizer())
    except UserError:
        return
    assert data.train and all(isinstance(e["input_ids"], array) and e["input_ids"].typecode == "i" for e in data.train)


message = st.dictionaries(st.sampled_from(["role", "content", "name"]),
                          st.sampled_from(["user", "assistant", "system", ""]) | json_values, max_size=3)


@settings(max_examples=FUZZ_CASES["chat"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["messages", "text"]), st.lists(message, max_size=4) | json_values,
                                max_size=2), max_size=6), st.booleans())
def test_fuzzed_chat_records(tmp_path, records, packing):
    from qelalora.run.data.records import load_task_data
    from qelalora.run.recipe import DataSection
    from tests.conftest import tiny_tokenizer
    from tests.test_data_sources import CHAT_TEMPLATE

    global _CHAT_TOKENIZER
    if _CHAT_TOKENIZER is None:
        _CHAT_TOKENIZER = tiny_tokenizer()
        _CHAT_TOKENIZER.chat_template = CHAT_TEMPLATE
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    section = DataSection(source=str(path), max_length=16, val_size=1, test_size=1, packing=packing)
    try:
        data = load_task_data(section, "causal-lm", _CHAT_TOKENIZER)
    except UserError:
        return
    assert data.train and all(len(e["input_ids"]) == len(e["labels"]) <= 16 for e in data.train)


_CHAT_TOKENIZER = None


@settings(max_examples=FUZZ_CASES["metadata"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["report.json", "rank_pattern.json", "memory.json"]), json_values | st.binary(max_size=50))
def test_fuzzed_run_metadata(capsys, tmp_path, name, value):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    good = {"report.json": {"steps": 1, "seconds": 1, "metrics": {}, "total_rank": {"initial": 1, "final": 1},
                            "rank_rounds": 0, "adapter_bytes_final": 1, "budget_bytes": 2},
            "rank_pattern.json": {"initial": {"a.0.q": 1}, "final": {"a.0.q": 1}, "total_rank": {"initial": 1, "final": 1}, "rounds": []},
            "memory.json": {"footprint": {"total_bytes": 1}, "measured_training_bytes": 1, "measured_peak_bytes": 1, "measured": "x"}}
    for n, v in good.items():
        (run / n).write_text(json.dumps(v))
    (run / name).write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
    code, out, err = run_cli(capsys, "report", str(run))
    assert code in (0, 2) and "Traceback" not in err
    if code:
        assert err.startswith("error: ")


def test_fuzz_case_counts_are_reported():
    # BENCHMARKS.md/README quote the number of fuzz cases; keep it in one place
    assert sum(FUZZ_CASES.values()) == 1000


# ---- safe loading ----

def test_no_pickle_anywhere_in_the_product():
    root = Path(__file__).resolve().parents[1]
    for path in list((root / "qelalora").rglob("*.py")) + list((root / "export").rglob("*.py")):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "yaml.load(" not in text, path
        assert "trust_remote_code=True" not in text, path


def test_trust_remote_code_is_off_by_default_and_announced(capsys, tiny_bert_dir):
    from qelalora.run.recipe import load_recipe

    assert load_recipe(None).model.trust_remote_code is False
    code, out, _ = run_cli(capsys, "plan", "--model", tiny_bert_dir, "--set", "model.trust_remote_code=true",
                           "--set", "data.max_length=32")
    assert code == 0 and "trust_remote_code is on" in out
    code, out, _ = run_cli(capsys, "plan", "--model", tiny_bert_dir, "--set", "data.max_length=32")
    assert code == 0 and "trust_remote_code" not in out


def test_run_outputs_stay_inside_the_run_dir(capsys, tmp_path, bert_recipe):
    run = tmp_path / "nested" / "run"
    before = {p for p in tmp_path.rglob("*")}
    assert run_cli(capsys, "train", "-r", bert_recipe, "-o", str(run), "--no-progress")[0] == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p == run.parent or run in p.parents or p == run for p in created), [p for p in created if run not in p.parents]


def test_one_writer_per_run_folder(capsys, tmp_path, tiny_bert_dir):
    """A second train or --resume on a folder in use stops with a clear error; the lock dies with its holder."""
    import signal
    import time

    from tests.cli_helpers import cli_process

    recipe = str(write_recipe(tmp_path / "long.yaml", tiny_bert_dir, write_cls_data(tmp_path / "d.jsonl"),
                              train={"steps": 100000, "checkpoint_every": 5, "log_every": 1},
                              elalora={"budget_mb": 0.3, "t_init": 2, "t_final": 3, "delta": 2, "b0": 2}))
    run = tmp_path / "run"
    first = cli_process("train", "-r", recipe, "-o", str(run), "--no-progress")
    deadline = time.time() + 120
    while not list(run.glob("checkpoints/step-*")):  # training is under way
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    try:
        for args in (("-r", recipe, "-o", str(run), "--overwrite"), ("--resume", str(run))):
            code, out, err = run_cli(capsys, "train", *args, "--no-progress")
            assert code == 2, (args, out, err)
            assert "is in use by another qelalora process (pid" in err and "Traceback" not in err
        assert first.poll() is None, "the first run must not have been disturbed"
        assert (run / "recipe.yaml").is_file()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, out, err = run_cli(capsys, "train", "-r", recipe, "-o", str(run), "--overwrite", "--no-progress",
                             "--set", "train.steps=6")
    assert code == 0, err  # the killed holder's lock is gone with it
    assert not (run / ".qelalora.lock").exists()
