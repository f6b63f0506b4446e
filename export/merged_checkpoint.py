"""A merged Hugging Face checkpoint written one layer at a time, for tools that build from one (ONNX Runtime
GenAI's model builder).

Each adapted or NF4 linear is merged (dequantised base + s B diag(E) A) and
written in fp32 as it is reached, then let go; tensors go into safetensors
shards of at most `SHARD_BYTES` with the standard index, so that the model is
never whole in memory in this process. A tied output projection is written
once, as `save_pretrained` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .streamed import Source, is_streamed_linear, release_tensors

SHARD_BYTES = 1 << 30


def _tensors(model: nn.Module, merge: bool):
    """(key, tensor, whether it is the model's own) in module order: merged linears (new tensors), and every
    other parameter and persistent buffer (the model's own, alive until the end: a tied one repeats)."""
    linears = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in linears):
            continue
        if is_streamed_linear(module):
            linears.append(name)
            weight, bias = Source(name, module, "linear", merge=merge).weight()
            yield f"{name}.weight", weight, False
            if bias is not None:
                yield f"{name}.bias", bias, False
            release_tensors(module, keep=set())
            continue
        for key, tensor in module.named_parameters(recurse=False):
            yield f"{name}.{key}" if name else key, tensor.detach(), True
        for key, tensor in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                yield f"{name}.{key}" if name else key, tensor, True


def write_merged_checkpoint(model: nn.Module, folder: Path, config, merge: bool = True) -> None:
    """Write `model` with its adapters merged (`merge` off: its dequantised base alone) as a sharded fp32
    safetensors checkpoint, with `config`; this consumes the model's linears."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    total, size, count = 0, 0, 0

    def flush():
        nonlocal shard, size, count
        if shard:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for key, tensor, own in _tensors(model, merge):
        if own:
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen:  # a tied table, written once
                continue
            seen.add(storage)
        tensor = tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
        if size and size + tensor.numel() * tensor.element_size() > SHARD_BYTES:
            flush()
        shard[key] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
