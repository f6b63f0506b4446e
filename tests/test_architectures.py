"""Architectures outside the table: targets discovered from the model, trained, resumed, exported."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import run_cli, write_cls_data, write_lm_data, write_recipe
from tests.conftest import _save

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _config(family):
    import transformers as tf

    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=32)
    if family == "phi3":
        return tf.Phi3Config(**SMALL, num_key_value_heads=2)
    if family == "qwen3":
        return tf.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16)
    if family == "modernbert":
        return tf.ModernBertConfig(**{k: v for k, v in SMALL.items() if k not in ("bos_token_id", "eos_token_id")},
                                   num_labels=2, cls_token_id=2, sep_token_id=3)
    raise ValueError(family)


# family -> (task, linears the discovery must find inside one block)
FAMILIES = {
    "gemma3_text": ("causal-lm", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "phi3": ("causal-lm", {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}),
    "qwen3": ("causal-lm", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "modernbert": ("seq-cls", {"attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    family = request.param
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if FAMILIES[family][0] == "causal-lm" else AutoModelForSequenceClassification
    return family, _save(auto.from_config(_config(family)), tmp_path_factory.mktemp(family))


def test_plan_shows_discovered_targets(family_dir, capsys):
    family, folder = family_dir
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--budget-mb", "1", "--set", "data.max_length=32", "--set", "model.targets=all-linear", "--json")
    assert code == 0, err
    plan = json.loads(out)
    task, linears = FAMILIES[family]
    assert plan["discovered"] is True and set(plan["targets"]) == linears and plan["target_layers"] == 2 * len(linears)
    code, out, _ = run_cli(capsys, "plan", "--model", folder, "--budget-mb", "1", "--set", "data.max_length=32",
                           "--set", "model.targets=all-linear")
    assert "found in the model" in out


def test_train_resume_and_export(family_dir, tmp_path, capsys):
    family, folder = family_dir
    causal = FAMILIES[family][0] == "causal-lm"
    data = write_lm_data(tmp_path / "d.jsonl") if causal else write_cls_data(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", folder, data, causal=causal, train={"steps": 16, "checkpoint_every": 8},
                          elalora={"budget_mb": 0.5, "t_init": 3, "t_final": 4, "delta": 3, "b0": 2})
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(run), "--no-progress")
    assert code == 0, err
    history = json.loads((run / "rank_pattern.json").read_text())
    assert len(history["rounds"]) >= 2 and all(r["adapter_bytes"] <= history["budget_bytes"] for r in history["rounds"])

    # resume from the middle: the same adapter, bit for bit
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step-00000016")
    for name in ("adapter", "peft"):
        shutil.rmtree(again / name)
    code, _, err = run_cli(capsys, "train", "--resume", str(again), "--no-progress")
    assert code == 0, err
    first, second = load_file(run / "adapter" / "adapter.safetensors"), load_file(again / "adapter" / "adapter.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # export: the bit-faithful format, checked against PyTorch
    code, out, err = run_cli(capsys, "export", str(run), "--format", "nf4-adapters", "-o", str(tmp_path / "onnx"))
    assert code == 0, err
    info = json.loads((tmp_path / "onnx" / "qelalora_export.json").read_text())["formats"]["nf4-adapters"]
    assert info["parity"]["max_abs_logit_diff"] <= 1e-3 * info["parity"]["logit_scale"]


def test_short_target_names_match_the_layers_of_any_architecture(tmp_path, capsys):
    """The SmolLM2 recipe's targets (q, k, v, o, gate, up, down) adapt Gemma-3's seven projections as they adapt
    Llama's, without model.targets=all-linear: a short name matches a linear named `<name>` or `<name>_proj`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = _save(AutoModelForCausalLM.from_config(_config("gemma3_text")), tmp_path / "gemma3")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def add(a, b):\n    return a + b  # {i}"}) + "\n" for i in range(200)))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "-r", "smollm2-135m-python-docs", "--model", folder, "--data", str(data),
                           "--steps", "4", "--budget-mb", "1", "-o", str(run), "--no-progress",
                           *[a for s in ("data.max_length=24", "data.val_size=16", "data.test_size=16", "train.batch_size=2",
                                         "train.eval_every=0", "train.checkpoint_every=0") for a in ("--set", s)])
    assert code == 0, err
    adapted = set(json.loads((run / "rank_pattern.json").read_text())["initial"])
    assert adapted == {f"model.layers.{i}.{p}" for i in range(2) for p in FAMILIES["gemma3_text"][1]}
