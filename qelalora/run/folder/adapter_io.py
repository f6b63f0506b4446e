"""Adapters on disk: qelalora's own format and a PEFT LoRA copy.

- qelalora's format: a safetensors file (A, E, B per live layer; head tensors)
  and a JSON config (base model, alpha, start, and r0, rank and scaling s per
  layer). The run folder's `adapter/` holds one (file names: `.layout`).
- PEFT's LoRA format, the run folder's `peft/`: the same adapter (`s B diag(E)` folded into
  `lora_B`, per-layer ranks in `rank_pattern`, `alpha_pattern` = rank so that
  PEFT's scaling is 1), loadable by PEFT and by ONNX Runtime GenAI's builder.
Both are written atomically and read with safetensors only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from qelalora.base.models import wrap_linears
from qelalora.errors import RunDirError
from qelalora.method.layer import ADAPTER_TENSORS, ElaLoRALinear

from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_WEIGHTS, read_json, write_json_atomic

ADAPTER_FORMAT = "qelalora-elalora-1"


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_adapter(
    out: Path,
    layers: dict[str, ElaLoRALinear],
    heads: dict[str, torch.Tensor],
    base_model: str,
    quantize: str,
    task: str,
    num_labels: int | None,
    label_names: list[str] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layer_meta = {}
    for name, layer in layers.items():
        layer_meta[name] = {"rank": layer.rank, "r0": layer.r0, "scaling": layer.scaling, "d_in": layer.in_features, "d_out": layer.out_features}
        if layer.rank == 0:
            continue
        for t in ADAPTER_TENSORS:
            tensors[f"{name}.{t}"] = getattr(layer, t)
    for name, value in heads.items():
        tensors[f"head/{name}"] = value
    save_safetensors_atomic(tensors, out / ADAPTER_WEIGHTS, {"format": ADAPTER_FORMAT})
    write_json_atomic(
        out / ADAPTER_CONFIG,
        {
            "format": ADAPTER_FORMAT,
            "base_model": base_model,
            "quantize": quantize,
            "task": task,
            "num_labels": num_labels,
            "id2label": {str(i): n for i, n in enumerate(label_names)} if label_names else None,
            "alpha": next(iter(layers.values())).alpha if layers else None,
            "start": next(iter(layers.values())).start if layers else None,
            "score_state": next(iter(layers.values())).score_state if layers else None,
            "layers": layer_meta,
            "heads": sorted(heads),
        },
    )


def save_peft_lora(
    out: Path, layers: dict[str, ElaLoRALinear], heads: dict[str, torch.Tensor], base_model: str, task: str, head_modules
) -> None:
    """PEFT LoRA copy: lora_A = A, lora_B = s B diag(E), scaling 1 per layer."""
    out.mkdir(parents=True, exist_ok=True)
    live = {name: layer for name, layer in layers.items() if layer.rank > 0}
    tensors = {}
    for name, layer in live.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.lora_B * (layer.lora_E * layer.scaling)).detach()
    for name, value in heads.items():
        tensors[f"base_model.model.{name}"] = value
    ranks = {name: layer.rank for name, layer in live.items()}
    r = max(ranks.values(), default=1)
    save_safetensors_atomic(tensors, out / PEFT_WEIGHTS, {"format": "pt"})
    write_json_atomic(
        out / ADAPTER_CONFIG,
        {
            "peft_type": "LORA",
            "task_type": {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}[task],
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": r,
            "rank_pattern": ranks,
            "alpha_pattern": ranks,
            "target_modules": sorted(live),
            "modules_to_save": list(head_modules) or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
        },
    )


def load_adapter(model: nn.Module, adapter_dir: Path) -> dict[str, ElaLoRALinear]:
    """Wrap `model`'s target layers and load a saved adapter (ranks as saved, heads included)."""
    try:
        config = read_json(adapter_dir / ADAPTER_CONFIG)
        tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read the adapter in {adapter_dir}: {err}") from None
    if config.get("format") != ADAPTER_FORMAT:
        raise RunDirError(f"{adapter_dir} holds an adapter of unknown format {config.get('format')!r}")
    layers = {}
    for path, meta in config["layers"].items():
        score_state = config.get("score_state") or "element"  # so that training can go on from a loaded adapter
        layers.update(wrap_linears(model, [path], meta["r0"], config["alpha"], score_state=score_state))
        layer = layers[path]
        layer.scaling = float(meta["scaling"])  # as trained (alpha / r0 or alpha / sqrt(r0))
        layer.start = config.get("start") or "gaussian"
        for t in ADAPTER_TENSORS:
            if meta["rank"] == 0:
                shape = {"lora_A": (0, layer.in_features), "lora_E": (0,), "lora_B": (layer.out_features, 0)}[t]
                value = torch.zeros(shape)
            else:
                value = tensors[f"{path}.{t}"]
            getattr(layer, t).data = value.to(getattr(layer, t).device)
        layer.reset_scores()  # score EMAs are not saved with an adapter: start them at zero, right-sized
    params = dict(model.named_parameters())
    for name in config["heads"]:
        params[name].data = tensors[f"head/{name}"].to(params[name].device)
    return layers
