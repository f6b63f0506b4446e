"""Tracing models to ONNX graphs.

Encoders (sequence classification) and adapter-input graphs are traced here
with torch.onnx's TorchScript exporter (custom MatMulBnb4 nodes come from
`modules._MatMulBnb4.symbolic`). Decoders with a KV cache go through
optimum's exporter, so the folder has the layout `ORTModelForCausalLM` loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .modules import NF4Linear

OPSET = 18
ADAPTER_A, ADAPTER_B = "lora_a.{}", "lora_b.{}"


class _AdapterInputs(nn.Module):
    """Calls the model with each adapted layer's branch taken from extra inputs."""

    def __init__(self, model: nn.Module, adapted: dict[str, NF4Linear], causal: bool):
        super().__init__()
        self.model, self.adapted, self.causal = model, list(adapted.values()), causal

    def forward(self, input_ids, attention_mask, *branches):
        for i, layer in enumerate(self.adapted):
            layer.branch = (branches[2 * i], branches[2 * i + 1])
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits if self.causal else \
            self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def adapter_input_names(adapted_names: list[str]) -> list[str]:
    """Graph input names of the branch matrices, in layer order (A then sB diag(E) per layer)."""
    return [n for name in adapted_names for n in (ADAPTER_A.format(name), ADAPTER_B.format(name))]


def trace_logits_graph(
    model: nn.Module,
    path: Path,
    example: dict[str, torch.Tensor],
    adapted: dict[str, NF4Linear] | None = None,
    example_branches: list[torch.Tensor] | None = None,
    causal: bool = False,
) -> None:
    """input_ids, attention_mask (+ branch matrices with symbolic per-layer ranks) -> logits."""
    names = ["input_ids", "attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    if causal:
        axes["logits"] = {0: "batch", 1: "sequence"}
    args = (example["input_ids"], example["attention_mask"])
    if adapted is not None:
        wrapper = _AdapterInputs(model, adapted, causal)
        branch_names = adapter_input_names(list(adapted))
        for i, name in enumerate(adapted):
            axes[branch_names[2 * i]] = {0: f"rank.{name}"}
            axes[branch_names[2 * i + 1]] = {1: f"rank.{name}"}
        names += branch_names
        args = args + tuple(example_branches)
    else:
        wrapper = _Logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            custom_opsets={"com.microsoft": 1},
            do_constant_folding=True,
        )


def export_decoder_with_cache(model: nn.Module, out_dir: Path) -> None:
    """Llama-family decoder with KV cache, in optimum's ORTModelForCausalLM layout."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(model, out_dir, task="text-generation-with-past", opset=OPSET, do_validation=False,
                               no_post_process=True)
