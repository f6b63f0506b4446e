"""`qelalora train` end to end on tiny models, and what the run directory holds."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qelalora.base.models import load_base_model
from qelalora.run.folder.adapter_io import load_adapter
from tests.cli_helpers import cli_process, run_cli, write_cls_data, write_lm_data, write_recipe

RUN_FILES = {
    "adapter", "peft", "checkpoints", "memory.json", "memory_plan.json", "metrics.jsonl", "rank_final.png",
    "rank_heatmap.png", "rank_pattern.json", "recipe.yaml", "report.json",
}


# Method settings every start, scaling, score layout and regulariser form go through end to end.
METHOD_SETTINGS = {
    "shipped-default": {},
    "reference": {"preset": "reference"},
    "lora-start": {"init": "lora", "gamma": 0.0, "lr_mult_B": 4.0},
    "residual": {"init": "residual", "scaling": "sqrt-rank", "score_state": "triplet", "lr_mult_E": 4.0},
    "orthonormal": {"init": "orthonormal", "score_state": "element-bf16", "regulariser": "squared", "gamma_decay": "linear"},
}


@pytest.mark.parametrize("settings", METHOD_SETTINGS, ids=list(METHOD_SETTINGS))
def test_train_bert_end_to_end(settings, tmp_path, tiny_bert_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, write_cls_data(tmp_path / "d.jsonl"),
                          elalora={"budget_mb": 0.3, "t_init": 5, "t_final": 8, "delta": 3, "b0": 3, **METHOD_SETTINGS[settings]})
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(run), "--no-progress")
    assert code == 0, err
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert {p.name for p in (run / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    assert {p.name for p in (run / "peft").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000020", "step-00000030"]
    history = json.loads((run / "rank_pattern.json").read_text())
    assert len(history["final"]) == 12 and len(history["rounds"]) == 5  # steps 8, 11, ..., 20 (t_i 5, t_f 8, delta 3)
    assert all(r["adapter_bytes"] <= history["budget_bytes"] for r in history["rounds"])
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 30 and 0 <= report["metrics"]["test"]["accuracy"] <= 1
    assert report["adapter_bytes_final"] <= 0.3 * 2**20
    memory = json.loads((run / "memory.json").read_text())
    assert memory["measured_peak_bytes"] > 0 and memory["footprint"]["total_bytes"] > memory["adapter_bytes"]
    assert memory["footprint"]["process_bytes"] > memory["footprint"]["total_bytes"]  # a CPU process: + code and heap
    assert "Memory plan" in out and "initial rank" in out and "for the process" in out
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [5, 10, 15, 20, 25, 30]

    # the saved adapter reproduces the trained model, through our loader and through PEFT
    from peft import PeftModel

    torch.manual_seed(0)
    base, _ = load_base_model(tiny_bert_dir, num_labels=2)
    layers = load_adapter(base, run / "adapter")
    assert {n: l.rank for n, l in layers.items()} == history["final"]
    score_state = yaml.safe_load((run / "recipe.yaml").read_text())["elalora"]["score_state"]
    for layer in layers.values():  # loaded layers keep the score layout, buffers sized for their rank
        assert layer.score_state == score_state
        for t in ("lora_A", "lora_E", "lora_B"):
            shape = (layer.rank,) if score_state == "triplet" else getattr(layer, t).shape
            assert all(buf.shape == shape for buf in layer.score_buffers(t))
    peft_config = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(Path(tiny_bert_dir).resolve())  # resolvable from anywhere
    peft_base, _ = load_base_model(peft_config["base_model_name_or_path"], num_labels=2)
    peft_model = PeftModel.from_pretrained(peft_base, run / "peft")
    ids = torch.randint(4, 128, (3, 10))
    base.eval(), peft_model.eval()
    with torch.no_grad():
        ours, theirs = base(input_ids=ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    trained = yaml.safe_load((run / "recipe.yaml").read_text())["elalora"]
    assert config["start"] == trained["init"]
    scale = (lambda r0: 16.0 / r0) if trained["scaling"] == "rank" else (lambda r0: 16.0 / r0**0.5)
    assert all(meta["scaling"] == pytest.approx(scale(meta["r0"])) for meta in config["layers"].values())
    saved = load_file(run / "adapter" / "adapter.safetensors")
    assert any(k.startswith("head/classifier") for k in saved)


def test_train_llama_prompt_completion(tmp_path, tiny_llama_dir, capsys):
    data = write_lm_data(tmp_path / "lm.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, data, causal=True)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(run), "--no-progress", "--set", "train.steps=20")
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 20
    test = report["metrics"]["test"]
    assert test["tokens"] > 0 and abs(test["perplexity"] - torch.tensor(test["loss"]).exp().item()) < 1e-3 * test["perplexity"]
    config = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["rank_pattern"] == {
        k: v for k, v in json.loads((run / "rank_pattern.json").read_text())["final"].items() if v > 0
    }


def test_plan_command_reports_rank_and_footprint(capsys, tiny_llama_dir):
    code, out, _ = run_cli(capsys, "plan", "--model", tiny_llama_dir, "--set", "model.targets=[q, v]",
                           "--set", "data.max_length=32", "--budget-mb", "1", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["target_layers"] == 4 and plan["rank_limited_by"] in ("budget", "max_init_rank", "layer width")
    assert plan["adapter_bytes"] <= plan["budget_bytes"] == 2**20


def test_plan_measure_runs_two_steps_and_sets_them_beside_the_plan(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, write_lm_data(tmp_path / "d.jsonl"), causal=True)
    proc = cli_process("plan", "-r", str(recipe), "--measure", "--json")  # a fresh process, as a user runs it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    lines = out.splitlines()
    out = "\n".join(lines[lines.index("{"):])  # the JSON after any library warnings
    result = json.loads(out)["measured"]
    assert result["shape"] == {"batch": 8, "seq": 24} and result["steps"] == 2
    assert result["predicted"]["total"] == json.loads(out)["footprint"]["total_bytes"]
    assert result["measured"]["resident"] > 0 and result["measured"]["peak"] >= result["measured"]["resident"]
    predicted, tensors = result["predicted"], result["tensors"]  # tensors counted as a GPU counts them
    assert json.loads(out)["footprint"]["traced"]  # activations from a step traced on fake tensors, not the formula
    assert 0.9 < tensors["peak"] / predicted["total"] < 1.1
    assert 0.9 < tensors["step_peak_above_resident"] / predicted["activations"] < 1.1
    assert 0.9 < tensors["eval_peak_above_resident"] / predicted["evaluation"] < 1.1
    assert predicted["process_total"] > predicted["total"]  # the CPU process: + code, tokeniser, C heap
    from qelalora.run.plan import memory_plan as plan
    from qelalora.run.train import build

    made = []
    real = plan.memory_plan
    monkeypatch.setattr(plan, "memory_plan", lambda *a, **k: made.append(1) or real(*a, **k))
    monkeypatch.setattr(build, "memory_plan", plan.memory_plan)
    code, out, _ = run_cli(capsys, "plan", "-r", str(recipe), "--measure")
    assert code == 0 and "tensors" in out and "steps above that (activations)" in out
    assert len(made) == 1  # the run that measures uses the plan printed, not a second trace


def test_report_command(tmp_path, tiny_bert_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, write_cls_data(tmp_path / "d.jsonl"), train={"steps": 15})
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "-r", str(recipe), "-o", str(run), "--no-progress")[0] == 0
    (run / "rank_final.png").unlink()
    code, out, _ = run_cli(capsys, "report", str(run))
    assert code == 0 and "total rank" in out and (run / "rank_final.png").stat().st_size > 1000


def test_plan_for_llama_8b_shapes_needs_no_weights(tmp_path, capsys):
    """A 512 MiB budget gives an 8B Llama rank 12 on all seven projections (config.json only)."""
    from tests.conftest import llama_config

    folder = tmp_path / "llama8b"
    llama_config(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
    ).save_pretrained(folder)
    code, out, err = run_cli(capsys, "plan", "-r", "llama-3.1-8b", "--model", str(folder), "--budget-mb", "512", "--json")
    assert code == 0, err
    plan = json.loads(out)
    # per rank and block: 16 bytes (value, gradient, two moments) * (8193 + 5121 + 5121 + 8193 + 3 * 18433)
    # + 7 * 24 bytes of per-triplet scores = 1.31 MB; 32 blocks -> 40 MiB per rank
    assert plan["target_layers"] == 224 and plan["initial_rank"] == 12 and plan["rank_limited_by"] == "budget"
    assert 0.93 < plan["budget_used"] <= 1.0  # rank 12 = 480 MiB; rank 13 would need 520 MiB
    # NF4 linears (7.0B params x ~0.53 B) + fp32 embeddings and untied lm_head on CPU (2 x 2.1 GB)
    assert 7.0e9 < plan["footprint"]["base_bytes"] < 8.5e9


def test_plan_from_the_recipes_own_config_and_for_a_24_gb_gpu(tmp_path, capsys):
    """Offline, the shipped 8B recipe plans from its model.config: the same plan as from the config folder above;
    --gpu-gb says what fits a 24 GB card in bf16 with and without gradient checkpointing."""
    code, out, err = run_cli(capsys, "plan", "-r", "llama-3.1-8b", "--budget-mb", "512", "--gpu-gb", "24", "--json")
    assert code == 0 and "planning from the recipe's model.config" in err
    plan = json.loads(out)
    assert plan["target_layers"] == 224 and plan["initial_rank"] == 12 and 7.0e9 < plan["footprint"]["base_bytes"] < 8.5e9
    gpu = plan["gpu"]
    without, with_ = gpu["without_checkpointing"], gpu["with_checkpointing"]
    assert gpu["gpu_bytes"] == 24 * 10**9 and with_["bytes"] < without["bytes"] / 2
    assert with_["fits"] and without["fits"] == (without["bytes"] <= 24 * 10**9)
    code, out, _ = run_cli(capsys, "plan", "-r", "llama-3.1-8b", "--gpu-gb", "8", "--set", "train.batch_size=8")
    assert code == 0 and "on a 8 GB GPU" in out and "does not fit" in out
    code, _, err = run_cli(capsys, "plan", "-r", "llama-3.1-8b", "--model", "nobody/another-model")
    assert code != 0 and "cannot load model 'nobody/another-model'" in err  # the 8B config is not another model's
    bad = tmp_path / "r.yaml"
    bad.write_text("model: {name: nobody/nothing-here, config: {model_type: not-a-model}}\n")
    code, _, err = run_cli(capsys, "plan", "-r", str(bad))
    assert code != 0 and "model.config in the recipe is not a transformers config" in err


@pytest.mark.parametrize("causal", [False, True])
def test_train_without_held_out_splits(causal, tmp_path, tiny_bert_dir, tiny_llama_dir, capsys):
    """data.test_size=0 and val_size=0 (the user keeps held-out data elsewhere): training runs, nothing is evaluated."""
    data = write_lm_data(tmp_path / "d.jsonl") if causal else write_cls_data(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir if causal else tiny_bert_dir, data, causal=causal,
                          train={"steps": 16, "eval_every": 4})
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(run), "--no-progress",
                             "--set", "data.val_size=0", "--set", "data.test_size=0")
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 16 and report["metrics"] == {}
    assert (run / "adapter" / "adapter.safetensors").is_file()


def test_peft_copy_names_a_base_that_loaders_can_open(tmp_path, monkeypatch):
    from qelalora.base import embedded

    assert (Path(embedded.loadable_name("embedded:minilm-l6")) / "config.json").is_file()
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    assert embedded.loadable_name("folder") == str(tmp_path / "folder")
    assert embedded.loadable_name("org/model-on-the-hub") == "org/model-on-the-hub"


def test_text_labels_are_named_classes_through_training_and_export(tmp_path, tiny_bert_dir, capsys):
    from qelalora.export.runtime import EdgeModel

    names = ["negative", "neutral", "positive"]
    rows = [{"text": f"{'good great' if i % 3 == 2 else 'bad awful' if i % 3 == 0 else 'plain'} film {i}", "label": names[i % 3]}
            for i in range(120)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, data, model={"num_labels": 3}, train={"steps": 16})
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(run), "--no-progress")
    assert code == 0, err
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    code, _, err = run_cli(capsys, "export", str(run), "--format", "merged-fp32", "-o", str(tmp_path / "onnx"))
    assert code == 0, err
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"} and config["label2id"]["neutral"] == 1
    (result,) = EdgeModel(tmp_path / "onnx").classify(["good great film"])
    assert result["name"] == names[result["label"]]

    # an explicit order wins over the sorted one, and a name outside it is a clear error
    recipe = write_recipe(tmp_path / "r2.yaml", tiny_bert_dir, data, model={"num_labels": 3}, train={"steps": 16})
    order = "data.label_names=[positive, neutral, negative]"
    code, _, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(tmp_path / "run2"), "--no-progress", "--set", order)
    assert code == 0, err
    assert json.loads((tmp_path / "run2" / "adapter" / "adapter_config.json").read_text())["id2label"]["0"] == "positive"
    code, _, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(tmp_path / "run3"), "--no-progress",
                           "--set", "data.label_names=[a, b, c]")
    assert code == 2 and "not in data.label_names" in err
