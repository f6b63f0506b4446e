"""Bad input: one clear paragraph and a non-zero exit, never a traceback, nothing overwritten."""

import json

import pytest

from tests.cli_helpers import run_cli, write_cls_data, write_recipe


@pytest.fixture()
def bert_recipe(tmp_path, tiny_bert_dir):
    def make(data=None, **sections):
        data = data if data is not None else write_cls_data(tmp_path / "d.jsonl")
        return str(write_recipe(tmp_path / "r.yaml", tiny_bert_dir, data, **sections))

    return make


def _fails(capsys, args, code, *needles):
    got, out, err = run_cli(capsys, *args)
    assert got == code, (got, out, err)
    assert "Traceback" not in out + err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_recipe(capsys, tmp_path):
    _fails(capsys, ["train", "-r", str(tmp_path / "nope.yaml")], 2, "no recipe named", "minilm-l6-rotten-tomatoes")


def test_unknown_keys_are_all_listed(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {nmae: x}\ntrain: {stepz: 3, lr: fast}\nextra: 1\n")
    _fails(capsys, ["train", "-r", str(bad)], 2, "4 problem(s)", "train.lr: expected float, got 'fast'", "model.nmae: unknown key", "train.stepz: unknown key", "extra: unknown section")


def test_override_of_unknown_key(capsys):
    _fails(capsys, ["plan", "--set", "elalora.rnak=4"], 2, "elalora.rnak: unknown key")


def test_budget_below_minimum_names_it(capsys, bert_recipe):
    _fails(capsys, ["train", "-r", bert_recipe(), "--budget-mb", "0.01"], 2, "smallest workable budget is", "--budget-mb")


def test_model_path_missing(capsys, tmp_path):
    _fails(capsys, ["plan", "--model", str(tmp_path / "no_model")], 2, "cannot load model")


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "does not exist"),
        ("", "holds no examples"),
        ('{"text": "a", "label": 1}\n{not json\n', "line 2: not valid JSON"),
        ('{"text": "a", "label": 1}\n[1, 2]\n', "must be a JSON object"),
        ('{"txt": "a", "label": 1}\n' * 10, "field 'text' is missing"),
        ('{"text": "a"}\n' * 10, "field 'label' is missing"),
        ('{"text": "a", "label": 3}\n' * 10, "label 3 is outside 0..1"),
        ('{"text": "a", "label": "pos"}\n' * 10, "1 class name(s) (pos) but model.num_labels is 2"),
        ('{"text": "a", "label": [1]}\n' * 10, "not an integer class index or a class name"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
def test_bad_data_files(capsys, tmp_path, bert_recipe, content, needle):
    data = tmp_path / "data.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    _fails(capsys, ["train", "-r", bert_recipe(data), "-o", str(tmp_path / "run")], 2, needle)
    assert not (tmp_path / "run").exists()  # a run that stopped before writing anything leaves no empty folder


def test_sequence_length_over_model_limit(capsys, tmp_path, bert_recipe):
    args = ["train", "-r", bert_recipe(), "--set", "data.max_length=100", "-o", str(tmp_path / "run")]
    _fails(capsys, args, 2, "over the model's limit of 64")


def test_existing_run_dir_is_not_overwritten(capsys, tmp_path, bert_recipe):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    _fails(capsys, ["train", "-r", bert_recipe(), "-o", str(run)], 2, "already exists", "--overwrite")
    assert (run / "precious.txt").read_text() == "keep me"


def test_nan_loss_stops_and_keeps_last_checkpoint(capsys, tmp_path, bert_recipe):
    run = tmp_path / "run"
    # a huge alpha makes the adapter branch overflow once E leaves zero (the paper's start: E = 0)
    recipe = bert_recipe(elalora={"preset": "reference", "alpha": 1e37, "budget_mb": 0.3, "t_init": 5, "t_final": 8, "delta": 3})
    err = _fails(capsys, ["train", "-r", recipe, "-o", str(run), "--no-progress", "--set", "train.checkpoint_every=1"], 3, "the loss became nan")
    step = int(err.split("at step ")[1].split(";")[0])
    assert step >= 2
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts[-1] == f"step-{step - 1:08d}"  # the last good step, nothing after it
    assert "the last good checkpoint is" in err


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    _fails(capsys, ["train", "--resume", str(tmp_path)], 2, "not a qelalora run directory")


def test_report_of_unfinished_run(capsys, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"steps": 1}))
    _fails(capsys, ["report", str(tmp_path)], 2, "not a finished run")


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    # GPT-2 keeps its weights in transformers' Conv1D, not in linear layers: nothing to adapt
    _fails(capsys, ["plan", "--model", str(tmp_path / "gpt2")], 2, "no repeated blocks with linear layers", "GPT2LMHeadModel")


def test_unreachable_hub_fails_fast_without_retries(capsys, monkeypatch):
    import time

    import huggingface_hub.constants
    import transformers.utils.hub

    from qelalora.base import hub

    # restored after the test: the process-wide offline switches the command flips
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.CONNECT_TIMEOUT_S: False)
    started = time.monotonic()
    _fails(capsys, ["plan", "--model", "no-such-org/no-such-model"], 2, "cannot load model", "not in the local cache")
    assert time.monotonic() - started < 10  # the libraries' own retries take about 30 s
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
