"""Gradient checkpointing: the same gradients for less activation memory, counted in the plan."""

import json

import pytest
import torch

from qelalora.base.models import head_params, load_base_model, target_paths
from qelalora.method.config import ElaLoRAConfig
from qelalora.run.train.step import prepare_training
from tests.cli_helpers import run_cli
from tests.helpers import cls_batches, hf_loss, lm_batches


def _gradients(model_dir, causal, checkpointing):
    torch.manual_seed(0)
    model, spec = load_base_model(model_dir, quantize="nf4")
    paths = target_paths(model, spec, list(spec.targets))
    state = prepare_training(model, paths, head_params(model, spec), ElaLoRAConfig(budget_mb=0.3, init="gaussian"), 10, lr=1e-3)
    for layer in state.layers.values():  # every factor non-zero, so that every gradient is
        layer.lora_E.data.fill_(1.0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    next(iter(state.layers.values())).register_forward_hook(lambda *_: calls.append(1))
    batch = next(lm_batches(128) if causal else cls_batches(128))
    hf_loss(model, batch).backward()
    assert len(calls) == (2 if checkpointing else 1)  # checkpointed blocks run forward again during backward
    trained = state.head_params + [p for layer in state.layers.values() for p in layer.adapter_params()]
    return [p.grad.clone() for p in trained]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_checkpointing_gives_the_same_gradients(arch, tiny_bert_dir, tiny_llama_dir):
    model_dir, causal = (tiny_llama_dir, True) if arch == "llama" else (tiny_bert_dir, False)
    plain, checkpointed = _gradients(model_dir, causal, False), _gradients(model_dir, causal, True)
    assert len(plain) == len(checkpointed) and all(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_plan_counts_checkpointing(capsys, tiny_llama_dir):
    def plan(setting):
        code, out, err = run_cli(capsys, "plan", "--model", tiny_llama_dir, "--set", f"train.gradient_checkpointing={setting}",
                                 "--set", "data.max_length=64", "--set", "model.targets=[q, v]", "--json")
        assert code == 0, err
        return json.loads(out)

    on, off, auto = plan("true"), plan("false"), plan("auto")
    assert on["gradient_checkpointing"] and not off["gradient_checkpointing"] and not auto["gradient_checkpointing"]  # auto: off on CPU
    assert on["footprint"]["activation_bytes"] < off["footprint"]["activation_bytes"]
    assert on["activation_bytes_other_choice"] == off["footprint"]["activation_bytes"]
    code, _, err = run_cli(capsys, "plan", "--model", tiny_llama_dir, "--set", "train.gradient_checkpointing=sometimes",
                           "--set", "model.targets=[q, v]")
    assert code == 2 and "train.gradient_checkpointing: true, false or auto" in err


def test_train_with_checkpointing_end_to_end(tmp_path, tiny_llama_dir, capsys):
    from tests.cli_helpers import write_lm_data, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, write_lm_data(tmp_path / "d.jsonl"), causal=True,
                          train={"steps": 16, "gradient_checkpointing": True})
    code, out, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(tmp_path / "run"), "--no-progress")
    assert code == 0, err
    assert "gradient checkpointing on" in out
    assert json.loads((tmp_path / "run" / "memory.json").read_text())["gradient_checkpointing"] is True
