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
ADAPTER_A, ADAPTER_B, HEAD = "lora_a.{}", "lora_b.{}", "head.{}"


class _AdapterInputs(nn.Module):
    """Calls the model with each adapted layer's branch, and the trained head, taken from extra inputs."""

    def __init__(self, model: nn.Module, adapted: dict[str, NF4Linear], head_names: list[str], causal: bool):
        super().__init__()
        self.model, self.adapted, self.head_names, self.causal = model, list(adapted.values()), head_names, causal

    def forward(self, input_ids, attention_mask, *tensors):
        n = 2 * len(self.adapted)
        branches, heads = tensors[:n], dict(zip(self.head_names, tensors[n:]))
        for i, layer in enumerate(self.adapted):
            layer.branch = (branches[2 * i], branches[2 * i + 1])
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.causal:
            kwargs = {"input_ids": input_ids, "attention_mask": _causal_mask(attention_mask),
                      "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
        saved = {}
        try:  # the head's parameters are swapped for the input tensors while tracing (functional_call cannot be traced)
            for name, tensor in heads.items():
                owner, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(owner)
                saved[name] = (module, leaf, module._parameters[leaf])
                module._parameters[leaf] = tensor
            return self.model(**kwargs).logits
        finally:
            for module, leaf, param in saved.values():
                module._parameters[leaf] = param


def _causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A 4-D additive causal mask built from plain ops (transformers' own mask code uses vmap, which tracing cannot follow)."""
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def adapter_input_names(adapted_names: list[str], head_names: list[str] = ()) -> list[str]:
    """Graph input names: branch matrices in layer order (A then s B diag(E)), then head tensors."""
    return [n for name in adapted_names for n in (ADAPTER_A.format(name), ADAPTER_B.format(name))] + [
        HEAD.format(h) for h in head_names
    ]


def trace_logits_graph(
    model: nn.Module,
    path: Path,
    example: dict[str, torch.Tensor],
    adapted: dict[str, NF4Linear] | None = None,
    example_branches: list[torch.Tensor] | None = None,
    causal: bool = False,
    heads: dict[str, torch.Tensor] | None = None,
) -> None:
    """input_ids, attention_mask (+ branch matrices with symbolic per-layer ranks, + head tensors) -> logits.

    With `adapted`, every branch input defaults to rank 0 and every head input
    to the values in `heads`, so the graph runs as is and an adapter overrides them.
    """
    names = ["input_ids", "attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    if causal:
        axes["logits"] = {0: "batch", 1: "sequence"}
    args = (example["input_ids"], example["attention_mask"])
    if adapted is not None:
        heads = heads or {}
        wrapper = _AdapterInputs(model, adapted, list(heads), causal)
        branch_names = adapter_input_names(list(adapted), list(heads))
        for i, name in enumerate(adapted):
            axes[branch_names[2 * i]] = {0: f"rank.{name}"}
            axes[branch_names[2 * i + 1]] = {1: f"rank.{name}"}
        names += branch_names
        args = args + tuple(example_branches) + tuple(heads.values())
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
            custom_opsets={"com.microsoft": 1} if any(isinstance(m, NF4Linear) for m in model.modules()) else None,
            do_constant_folding=True,
        )
    if adapted is not None:
        _add_defaults(path, branch_names, example_branches, list(heads.values()))


def _add_defaults(path: Path, names: list[str], branches: list[torch.Tensor], heads: list[torch.Tensor]) -> None:
    """Give each adapter input an initializer of the same name: empty (rank 0) branches, the given heads.

    An input with an initializer is optional: without an active adapter the
    graph runs with these defaults, and an adapter overrides them.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    defaults = [np.zeros((0, b.shape[1]) if i % 2 == 0 else (b.shape[0], 0), dtype=np.float32) for i, b in enumerate(branches)]
    defaults += [h.detach().float().numpy() for h in heads]
    for name, value in zip(names, defaults):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.save(model, str(path))


def export_decoder_with_cache(model: nn.Module, out_dir: Path, defer_checks: bool = False) -> list:
    """Llama-family decoder with KV cache, in optimum's ORTModelForCausalLM layout.

    optimum opens the traced graph in ONNX Runtime at once to fix the names of its output axes. A graph traced
    with placeholders (`streamed`) cannot run until its weights are in, so with `defer_checks` that step is
    returned, to be called on the finished graph, instead of run."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.onnx.base import OnnxConfig

    deferred: list = []
    original = OnnxConfig.fix_dynamic_axes

    def defer(config, model_path, *args, **kwargs):
        deferred.append(lambda: original(config, model_path, *args, **kwargs))

    if defer_checks:
        OnnxConfig.fix_dynamic_axes = defer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, out_dir, task="text-generation-with-past", opset=OPSET, do_validation=False,
                                   no_post_process=True)
    finally:
        OnnxConfig.fix_dynamic_axes = original
    return deferred
