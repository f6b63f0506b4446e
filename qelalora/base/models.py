"""Model loading and adapter placement; the only module that knows architecture names.

Each architecture is a small declarative spec: where its transformer blocks
are, which linears inside a block can be adapted (short name -> path), and
which modules form a trainable task head. The table gives short names and
known heads for common families; any other architecture gets a spec
discovered from the model itself (every linear in its repeated blocks, like
PEFT's `all-linear`). Layers are found by walking exact paths, never by
matching substrings of parameter names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UserError
from ..method.layer import ElaLoRALinear
from .checkpoint_reads import checkpoint_mapped, one_tensor_at_a_time
from .footprint import release_free_heap


@dataclass(frozen=True)
class ArchSpec:
    task: str  # "causal-lm" or "seq-cls"
    blocks: str  # ModuleList of transformer blocks, relative to `model.base_model` (or to the model, if discovered)
    targets: dict[str, str]  # short name -> linear's path inside one block
    heads: tuple[str, ...] = ()  # trainable head modules, relative to the top-level model
    discovered: bool = False  # found by walking the model (architecture not in the table)

    @property
    def unquantized(self) -> tuple[str, ...]:
        """Linears that stay out of NF4: trainable heads, and the LM head (tied to the embeddings)."""
        return (*self.heads, "lm_head")


_LLAMA = ArchSpec(
    task="causal-lm",
    blocks="layers",
    targets={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)
_BERT_TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": ArchSpec("seq-cls", "encoder.layer", _BERT_TARGETS, heads=("bert.pooler.dense", "classifier")),
    "roberta": ArchSpec("seq-cls", "encoder.layer", _BERT_TARGETS, heads=("classifier.dense", "classifier.out_proj")),
    "deberta-v2": ArchSpec(
        "seq-cls",
        "encoder.layer",
        {
            "query": "attention.self.query_proj",
            "key": "attention.self.key_proj",
            "value": "attention.self.value_proj",
            "attn_out": "attention.output.dense",
            "intermediate": "intermediate.dense",
            "output": "output.dense",
        },
        heads=("pooler.dense", "classifier"),
    ),
    "distilbert": ArchSpec(
        "seq-cls",
        "transformer.layer",
        {
            "query": "attention.q_lin",
            "key": "attention.k_lin",
            "value": "attention.v_lin",
            "attn_out": "attention.out_lin",
            "intermediate": "ffn.lin1",
            "output": "ffn.lin2",
        },
        heads=("pre_classifier", "classifier"),
    ),
}


class ModelError(UserError):
    """The model cannot be loaded or adapted as asked."""


def arch_spec(config, task: str = "auto") -> ArchSpec:
    """The table's spec for a known architecture; for any other, one discovered from the model itself."""
    known = ARCHITECTURES.get(config.model_type)
    if known is not None and task in ("auto", known.task):
        return known
    return discover_spec(config, task)


def guess_task(model_type: str) -> str:
    """Encoders (those with a masked-LM head in transformers) classify; other causal-LM models generate."""
    from transformers.models.auto import modeling_auto as auto

    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "seq-cls"
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    if model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "seq-cls"
    raise ModelError(
        f"architecture {model_type!r} has neither a causal-LM nor a sequence-classification class in transformers; "
        f"the table covers {', '.join(sorted(ARCHITECTURES))}"
    )


def discover_spec(config, task: str = "auto") -> ArchSpec:
    """Like PEFT's `all-linear`: every linear inside the repeated transformer blocks (the largest ModuleList of
    one block class), found on a weightless copy of the model; embeddings and the LM head stay out. For
    sequence classification the head is every top-level module beside the base model that has weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = guess_task(config.model_type) if task == "auto" else task
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except (ValueError, KeyError) as err:
        raise ModelError(f"architecture {config.model_type!r} cannot be built for {task}: {str(err).splitlines()[0][:200]}") from None
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    lists = [(name, m) for name, m in lists if any(_is_linear(x) for x in m[0].modules())]
    if not lists:
        raise ModelError(f"no repeated blocks with linear layers found in {type(model).__name__}")
    blocks, modules = max(lists, key=lambda item: len(item[1]))
    targets = {rel: rel for rel, m in modules[0].named_modules() if rel and _is_linear(m)}
    heads: tuple[str, ...] = ()
    if task == "seq-cls":
        base = model.base_model
        heads = tuple(name for name, child in model.named_children() if child is not base and any(True for _ in child.parameters()))
    return ArchSpec(task, blocks, targets, heads, discovered=True)


def select_targets(spec: ArchSpec, targets: Sequence[str] | str | None) -> list[str]:
    """Target keys from a recipe: None or "all-linear" = all; otherwise the table's short names, in-block paths,
    names of the layers themselves (`q` or `q_proj` matches `self_attn.q_proj` in any architecture, as PEFT
    matches a module name's end) or regexes (full match on the in-block path, e.g. "self_attn\\..*_proj")."""
    if targets is None or targets == "all-linear":
        return list(spec.targets)
    chosen: list[str] = []
    for t in [targets] if isinstance(targets, str) else targets:
        matches = [t] if t in spec.targets else _by_layer_name(spec, t) or _by_pattern(spec, t)
        if not matches:
            raise ModelError(f"target {t!r} matches no linear; this architecture has {list(spec.targets)} "
                             "(model.targets: all-linear takes them all)")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def _by_layer_name(spec: ArchSpec, name: str) -> list[str]:
    """Keys of the linears whose own name (the in-block path's last part) is `name` or `<name>_proj`."""
    return [k for k, rel in spec.targets.items() if rel.rpartition(".")[2] in (name, f"{name}_proj")]


def _by_pattern(spec: ArchSpec, pattern: str) -> list[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ModelError(f"target {pattern!r} is neither a name nor a valid regular expression ({err})") from None
    return [k for k, rel in spec.targets.items() if compiled.fullmatch(rel) or compiled.fullmatch(k)]


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def base_model_prefix(model: nn.Module) -> str:
    """Where the base model sits in a task model (`bert`, `model`), or "" when the model is its own base.
    Checkpoints name their tensors with or without it; table specs count their block paths from it."""
    return model.base_model_prefix if model.base_model is not model else ""


def target_paths(model: nn.Module, spec: ArchSpec, targets: Sequence[str] | str | None) -> list[str]:
    """Full module paths of the target linears, in block order then target order."""
    targets = select_targets(spec, targets)
    prefix = "" if spec.discovered else base_model_prefix(model)  # a discovered spec's paths start at the model
    blocks_path = f"{prefix}.{spec.blocks}" if prefix else spec.blocks
    blocks = model.get_submodule(blocks_path)
    return [f"{blocks_path}.{i}.{spec.targets[t]}" for i in range(len(blocks)) for t in targets]


def wrap_linears(
    model: nn.Module,
    paths: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init_std: float = 0.02,
    seed: int = 0,
    start: str = "gaussian",
    scaling: str = "rank",
    score_state: str = "element",
) -> dict[str, ElaLoRALinear]:
    """Replace each linear at `paths` with an ElaLoRA layer; returns them by path, in order."""
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, ElaLoRALinear] = {}
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, leaf)
        if not _is_linear(base):
            raise ModelError(f"{path} is a {type(base).__name__}, not a linear layer")
        layer = ElaLoRALinear(
            base, rank, alpha, dropout=dropout, init_std=init_std, generator=generator,
            start=start, scaling=scaling, score_state=score_state,
        )
        setattr(parent, leaf, layer)
        layers[path] = layer
    return layers


def head_modules(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """The model's task-head modules that exist (e.g. BERT without a pooler has none there)."""
    modules = []
    for path in spec.heads:
        try:
            modules.append(model.get_submodule(path))
        except AttributeError:
            continue
    return modules


def head_params(model: nn.Module, spec: ArchSpec) -> list[nn.Parameter]:
    """Trainable head parameters (made trainable here), in a fixed order. Like every trained tensor they are
    kept in fp32 on every device, as PEFT's k-bit preparation does: a head loaded in bf16 (the CUDA compute
    type) is upcast, and its inputs are cast to fp32 on the way in."""
    params = []
    for module in head_modules(model, spec):
        if any(p.dtype != torch.float32 for p in module.parameters()):
            _to_fp32(module)
            module.register_forward_pre_hook(_fp32_inputs)
        params += list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def _to_fp32(module: nn.Module) -> None:
    """Give `module` fp32 copies of its parameters as new Parameters (what `.float()` does, also for the plan's
    fake tensors, which `.float()` cannot convert in place)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.dtype != torch.float32:
                sub.register_parameter(name, nn.Parameter(p.detach().float(), requires_grad=p.requires_grad))


def _fp32_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def load_base_model(
    name_or_path: str,
    quantize: str = "nf4",
    num_labels: int | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    compute_dtype: torch.dtype | None = None,
    task: str = "auto",
) -> tuple[nn.Module, ArchSpec]:
    """Load a Hugging Face model with its frozen linears in NF4 (or plain, `quantize="none"`); the frozen
    weights and activations in `compute_dtype` (default bf16 on CUDA, fp32 on the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    spec = arch_spec(config, task)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": compute_dtype}
    if quantize == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(spec.unquantized),
        )
        kwargs["device_map"] = {"": device}
    elif quantize != "none":
        raise ModelError(f"quantize must be 'nf4' or 'none', got {quantize!r}")
    with one_tensor_at_a_time():
        if spec.task == "seq-cls":
            # a checkpoint whose head has another number of classes gets a fresh head of the right size
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels or 2,
                                                                       ignore_mismatched_sizes=True, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if quantize == "none":
        model.to(device)
    if device == "cpu":
        if checkpoint_mapped():  # a checkpoint read another way (not safetensors)
            own_weights(model)
        release_free_heap()
    keep_nf4_layout(model)
    freeze_all(model)
    return model, spec


def own_weights(model: nn.Module) -> None:
    """Copy the tensors that still point into the checkpoint's memory-mapped file into the process's own memory.

    transformers loads CPU weights without copying them where it can, so the float tensors (embeddings, norms,
    heads) keep the whole safetensors file mapped, and every page read while quantising stays in the process's
    RSS: 417 MiB of SmolLM2's 540 MB file, to hold a 113 MB embedding. A copy frees the mapping.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is not None and not isinstance(tensor, bnb.nn.Params4bit):
                tensor.data = tensor.data.clone()


def keep_nf4_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for CPU inference in eval mode.

    On CPUs with AVX512-BF16 it rewrites the weights into another layout the
    first time a layer runs in eval mode, and training afterwards fails
    (in-place bias add on a leaf view). The base must stay the exact bytes we
    train against, so evaluation in the middle of training keeps that layout.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
