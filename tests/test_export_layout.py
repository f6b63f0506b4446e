"""The export folder's layout: the Hub / transformers.js layout, several precisions of one run in one folder,
no local paths in any file, and folders written in the older flat layout still open."""

import json
import shutil
import sys

import pytest

from qelalora.errors import RunDirError
from qelalora.export.exporter import export_run
from qelalora.export.layout import SUMMARY, format_info
from qelalora.export.runtime import open_export
from tests.cli_helpers import run_cli
from tests.test_export import _train, bert_run, llama_run  # noqa: F401  (module fixtures)


def _quiet(*_):
    pass


def test_precisions_of_one_run_share_a_folder_in_the_hub_layout(bert_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    fp32 = export_run(bert_run, out, "merged-fp32", log=_quiet)
    int4 = export_run(bert_run, out, "merged-int4", log=_quiet)
    assert (fp32["file"], int4["file"]) == ("onnx/model.onnx", "onnx/model_q4.onnx")
    assert sum(fp32["ranks"].values()) == sum(fp32["prune"]["ranks_after"].values()) > 0  # taken before the build
    top = sorted(p.name for p in out.iterdir())
    assert "onnx" in top and "config.json" in top and "tokenizer.json" in top and not [n for n in top if n.endswith(".onnx")]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model.onnx", "model_q4.onnx"]
    summary = json.loads((out / SUMMARY).read_text())
    assert sorted(summary["formats"]) == ["merged-fp32", "merged-int4"]
    assert summary["formats"]["merged-fp32"]["parity"] == fp32["parity"]  # the first precision's entry is kept
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": "q4"}  # the smallest graph is the default
    # each precision opens by name; without one, the default (the smallest)
    assert open_export(out).info["format"] == "merged-int4"
    assert open_export(out, fmt="merged-fp32").info["format"] == "merged-fp32"
    code, got, err = run_cli(capsys, "infer", str(out), "-f", "merged-fp32", "tok1 tok2")
    assert code == 0, err
    assert json.loads(got.strip().splitlines()[-1])["label"] in (0, 1)
    code, _, err = run_cli(capsys, "infer", str(out), "-f", "merged-int8", "tok1")
    assert code == 2 and "holds no merged-int8 export; it holds: merged-fp32, merged-int4" in err
    # the same precision again: refused, or replaced with --overwrite (the other one stays)
    with pytest.raises(RunDirError, match="holds a merged-int4 export already; pass --overwrite"):
        export_run(bert_run, out, "merged-int4", log=_quiet)
    export_run(bert_run, out, "merged-int4", overwrite=True, log=_quiet)
    assert sorted(json.loads((out / SUMMARY).read_text())["formats"]) == ["merged-fp32", "merged-int4"]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model.onnx", "model_q4.onnx"]


def test_another_runs_folder_is_refused_before_the_work(bert_run, tmp_path_factory, tiny_bert_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    export_run(bert_run, out, "merged-int8", log=_quiet)
    other = _train(tmp_path_factory, "bert-other", tiny_bert_dir, False, budget_mb=0.2, b0=5)
    with pytest.raises(RunDirError, match="holds the export of another run; pass --overwrite"):
        export_run(other, out, "merged-fp32", log=_quiet)
    export_run(other, out, "merged-fp32", overwrite=True, log=_quiet)  # replaced whole
    assert sorted(json.loads((out / SUMMARY).read_text())["formats"]) == ["merged-fp32"]
    assert not (out / "onnx" / "model_quantized.onnx").exists()


def test_no_exported_file_names_a_local_path(llama_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    export_run(llama_run, out, "merged-int8", log=_quiet)
    local = [str(llama_run.parent.parent), str(tmp_path), sys.prefix]  # the run's, the model's and data's, the venv
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".model", ".jinja"):
            text = path.read_text(encoding="utf-8")
            assert not [p for p in local if p in text], path.name
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "tiny_llama0"
    assert json.loads((out / SUMMARY).read_text())["data"]["source"] == "d.jsonl"
    code, _, err = run_cli(capsys, "eval", str(out))  # so eval asks where the data is
    assert code == 2 and "this export was trained on d.jsonl; pass --data PATH" in err
    code, got, err = run_cli(capsys, "eval", str(out), "--data", str(llama_run.parent / "d.jsonl"), "--limit", "4")
    assert code == 0 and json.loads(got.strip().splitlines()[-1])["perplexity"] > 1, err


def test_a_folder_in_the_older_flat_layout_still_opens(bert_run, tmp_path):  # noqa: F811
    """Folders written before the Hub layout: model.onnx and a one-format summary at the top."""
    new = tmp_path / "new"
    export_run(bert_run, new, "merged-fp32", log=_quiet)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(new / "onnx" / "model.onnx", old / "model.onnx")
    shutil.copy(new / "tokenizer.json", old / "tokenizer.json")
    summary = json.loads((new / SUMMARY).read_text())
    entry = summary.pop("formats")["merged-fp32"]
    (old / SUMMARY).write_text(json.dumps({**summary, **entry, "format": "merged-fp32"}))
    info = format_info(old)
    assert info["format"] == "merged-fp32" and info["file"] == "model.onnx" and info["task"] == "seq-cls"
    assert (open_export(old).logits([[5, 6, 7]]) == open_export(new).logits([[5, 6, 7]])).all()
    with pytest.raises(RunDirError, match="older flat layout; pass --overwrite"):
        export_run(bert_run, old, "merged-int4", log=_quiet)
