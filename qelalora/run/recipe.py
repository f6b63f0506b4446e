"""Recipes: YAML files with four sections (model, data, train, elalora), validated at once.

Every problem in a recipe is reported in one error (unknown keys included),
and any key can be overridden from the command line as `section.key=value`.
YAML is read with the safe loader only.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import RecipeError
from ..method.config import (ALLOCATIONS, GAMMA_DECAYS, OPTIMIZERS, PRESETS, REGULARISER_FORMS, SCALINGS, SCORE_STATES,
                             STARTS, ElaLoRAConfig)

MAX_RECIPE_BYTES = 1 << 20
DEFAULT_RECIPE = "minilm-l6-rotten-tomatoes"  # the embedded default job


@dataclass
class ModelSection:
    name: str = "embedded:minilm-l6"  # hub id, local folder, or embedded:minilm-l6 / embedded:smollm2-135m
    quantize: str = "nf4"  # nf4 | none
    targets: list[str] | str | None = None  # None or "all-linear" = every linear in the blocks; or names / regexes
    task: str = "auto"  # auto | causal-lm | seq-cls (auto: from the architecture)
    num_labels: int = 2  # sequence classification only
    trust_remote_code: bool = False
    # the model's config.json fields (model_type, sizes), so that `qelalora plan` works without the weights and offline
    config: dict[str, object] | None = None


@dataclass
class DataSection:
    # rotten-tomatoes | python-docs | python-stdlib | a .jsonl/.csv/.txt file | through `datasets`: a .parquet/.arrow
    # file, a folder of data files (train.jsonl, validation.jsonl, ...) or saved with save_to_disk, hf:NAME[:CONFIG]
    source: str = "rotten-tomatoes"
    # the data's own splits: {train: ..., val: ..., test: ...}, each a file or a split name of `source`; a split left
    # out is cut from train (val_size / test_size). Unset: a datasets source's train/validation/test if it has them,
    # else the seeded split of the whole source.
    splits: dict[str, str] | None = None
    text_field: str = "text"
    label_field: str = "label"
    label_names: list[str] | None = None  # class names in id order, for text labels (default: sorted)
    prompt_field: str | None = None  # causal LM with prompt + completion: loss on the completion only
    completion_field: str | None = None
    messages_field: str = "messages"  # chat records (causal LM): the tokenizer's chat template, loss on assistant turns
    packing: bool = False  # causal LM: pack examples into max_length blocks (no padding; attention crosses examples)
    max_length: int = 128
    val_size: int | float = 1000  # examples (or blocks), or a fraction
    test_size: int | float = 2000
    split_seed: int = 0
    max_train_examples: int | None = None


@dataclass
class TrainSection:
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int | float = 0.06
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 50  # cap on validation batches per evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    # true | false | "auto": on when the planned footprint without it would not fit the CUDA device (off on CPUs)
    gradient_checkpointing: bool | str = "auto"


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    elalora: ElaLoRAConfig = field(default_factory=ElaLoRAConfig)
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "elalora": ElaLoRAConfig}


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is object:
        return True
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item) for k, v in value.items())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    return False


def _coerce_number(value, annotation):
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it where a number is expected."""
    if isinstance(value, str) and not _type_ok(value, annotation) and _type_ok(1.5, annotation):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _describe(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(name: str, cls, raw, errors: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{name}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    raw = _with_preset(name, raw, errors)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key in known:
            value = _coerce_number(value, hints[key])
        if key not in known:
            errors.append(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
        elif not _type_ok(value, hints[key]):
            errors.append(f"{name}.{key}: expected {_describe(hints[key])}, got {value!r}"[:300])
        else:
            values[key] = value
    return cls(**values)


def _with_preset(name: str, raw: dict, errors: list[str]) -> dict:
    """The elalora section with its preset's values under the keys it sets itself."""
    preset = raw.get("preset") if name == "elalora" else None
    if preset is None:
        return raw
    if preset not in PRESETS:
        errors.append(f"elalora.preset: one of {', '.join(PRESETS)} (or null), got {preset!r}"[:300])
        return raw
    return {**PRESETS[preset], **raw}


def _check_ranges(recipe: Recipe, errors: list[str]) -> None:
    m, d, t, e = recipe.model, recipe.data, recipe.train, recipe.elalora

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    need(m.quantize in ("nf4", "none"), f"model.quantize: must be 'nf4' or 'none', got {m.quantize!r}")
    need(m.num_labels >= 2, f"model.num_labels: must be >= 2, got {m.num_labels}")
    need(m.task in ("auto", "causal-lm", "seq-cls"), f"model.task: auto, causal-lm or seq-cls, got {m.task!r}")
    need(d.max_length >= 2, f"data.max_length: must be >= 2, got {d.max_length}")
    need((d.prompt_field is None) == (d.completion_field is None), "data: give both prompt_field and completion_field, or neither")
    bad_splits = sorted(set(d.splits or {}) - {"train", "val", "test"})
    need(not bad_splits, f"data.splits: keys are train, val and test, got {', '.join(bad_splits)}")
    need(d.splits is None or "train" in d.splits, "data.splits: name the train split (val and test may be cut from it)")
    for key in ("val_size", "test_size"):
        v = getattr(d, key)
        need(v >= 0, f"data.{key}: must be >= 0, got {v}")
    need(1 <= t.steps <= 10**8, f"train.steps: must be between 1 and 100,000,000, got {t.steps}")
    need(d.max_length <= 1 << 20, f"data.max_length: must be at most 1,048,576, got {d.max_length}")
    need(m.num_labels <= 1 << 20, f"model.num_labels: must be at most 1,048,576, got {m.num_labels}")
    need(e.max_init_rank <= 1 << 16 and e.k <= 1 << 16 and e.b0 <= 1 << 20, "elalora.max_init_rank, k and b0: unreasonably large")
    need(1 <= t.batch_size <= 65536, f"train.batch_size: must be between 1 and 65536, got {t.batch_size}")
    need(0 < t.lr < 1, f"train.lr: must be between 0 and 1, got {t.lr}")
    need(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    need(0 <= t.seed < 2**63 and 0 <= d.split_seed < 2**63, "train.seed and data.split_seed: must be between 0 and 2^63 - 1")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(t.gradient_checkpointing in (True, False, "auto"), f"train.gradient_checkpointing: true, false or auto, got {t.gradient_checkpointing!r}")
    need(d.max_train_examples is None or d.max_train_examples >= 1, "data.max_train_examples: must be >= 1 (or null)")
    need(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), f"train.device: auto, cpu or cuda, got {t.device!r}")
    for key in ("eval_every", "checkpoint_every", "log_every", "eval_batches"):
        need(getattr(t, key) >= 0, f"train.{key}: must be >= 0, got {getattr(t, key)}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
    need(0 < e.budget_mb <= 2**30, f"elalora.budget_mb: must be a positive number of MiB, got {e.budget_mb}")
    need(e.rank == "auto" or (isinstance(e.rank, int) and e.rank >= 1), f"elalora.rank: 'auto' or an integer >= 1, got {e.rank!r}")
    need(e.max_init_rank >= 1, f"elalora.max_init_rank: must be >= 1, got {e.max_init_rank}")
    need(e.r_min >= 0, f"elalora.r_min: must be >= 0, got {e.r_min}")
    need(e.k >= 1 and e.b0 >= 0, f"elalora.k must be >= 1 and elalora.b0 >= 0, got k={e.k}, b0={e.b0}")
    need(0 < e.beta1 < 1 and 0 < e.beta2 < 1, "elalora.beta1 and elalora.beta2: must be between 0 and 1")
    need(e.gamma >= 0 and e.alpha > 0, "elalora.gamma must be >= 0 and elalora.alpha > 0")
    need(0 <= e.dropout < 1, f"elalora.dropout: must be in [0, 1), got {e.dropout}")
    choices = {"init": STARTS, "scaling": SCALINGS, "regulariser": REGULARISER_FORMS, "gamma_decay": GAMMA_DECAYS,
               "score_state": SCORE_STATES, "allocation": ALLOCATIONS, "optimizer": OPTIMIZERS}
    for key, allowed in choices.items():
        need(getattr(e, key) in allowed, f"elalora.{key}: one of {', '.join(allowed)}, got {getattr(e, key)!r}"[:300])
    need(e.init != "residual" or m.quantize == "nf4",
         "elalora.init: residual starts from the NF4 quantisation error; it needs model.quantize: nf4")
    need(0 < e.init_std <= 1, f"elalora.init_std: must be in (0, 1], got {e.init_std}")
    for key in ("lr_mult_E", "lr_mult_B"):
        need(0 < getattr(e, key) <= 1e4, f"elalora.{key}: must be in (0, 10000], got {getattr(e, key)}")
    for key in ("t_init", "t_final", "delta"):
        need(getattr(e, key) >= 0, f"elalora.{key}: must be >= 0, got {getattr(e, key)}")
    if not errors:
        try:
            e.schedule(t.steps)
        except ValueError as err:
            errors.append(f"elalora schedule: {err}")


def recipe_from_dict(raw, source: str = "recipe") -> Recipe:
    """Build and validate a recipe; raises RecipeError listing every problem."""
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with sections {', '.join(SECTIONS)}")
    sections = {}
    for key, value in raw.items():
        if key == "description":
            if not isinstance(value, str):
                errors.append("description: expected a string")
        elif key not in SECTIONS:
            errors.append(f"{key}: unknown section (known: {', '.join(SECTIONS)}, description)")
        else:
            sections[key] = _build_section(key, SECTIONS[key], value, errors)
    recipe = Recipe(**sections, description=raw.get("description", "") if isinstance(raw.get("description"), str) else "")
    if not errors:
        _check_ranges(recipe, errors)
    if errors:
        listing = "\n  - ".join(errors)
        raise RecipeError(f"{source} has {len(errors)} problem(s):\n  - {listing}")
    return recipe


def shipped_recipes() -> dict[str, Path]:
    """Recipes installed with the package, by name (file stem)."""
    folder = resources.files("qelalora.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def read_yaml(path: Path):
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES} bytes; is it really a recipe?")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {path} is not UTF-8 text") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise RecipeError(f"recipe file {path} is not valid YAML: {str(err)[:500]}") from None


def load_recipe_raw(name_or_path: str | None) -> tuple[dict, str]:
    """The raw mapping of a shipped recipe (by name) or a YAML file; None = the embedded default."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    shipped = shipped_recipes()
    path = shipped.get(name_or_path) or Path(name_or_path)
    if not path.exists() and name_or_path not in shipped:
        raise RecipeError(
            f"no recipe named {name_or_path!r}: give a YAML file path or one of: {', '.join(sorted(shipped))}"
        )
    raw = read_yaml(path)
    return (raw if raw is not None else {}), str(path)


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value` -> (section, key, YAML-typed value)."""
    target, sep, value = text.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not key:
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return section, key, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    if not isinstance(raw, dict):
        return raw
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(merged.get(section, {}), dict):
            raise RecipeError(f"override {text!r}: section {section!r} is not a mapping in the recipe")
        merged.setdefault(section, {})[key] = value
    return merged


def load_recipe(name_or_path: str | None, overrides: list[str] = ()) -> Recipe:
    raw, source = load_recipe_raw(name_or_path)
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    if "model.name" in keys and not any(k.startswith("model.config") for k in keys) and isinstance(raw, dict) \
            and isinstance(raw.get("model"), dict):
        raw["model"].pop("config", None)  # the recipe's config describes the recipe's model, not another one
    return recipe_from_dict(apply_overrides(raw, list(overrides)), source)


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.to_dict()
    if not data["description"]:
        del data["description"]
    return yaml.safe_dump(data, sort_keys=False)
