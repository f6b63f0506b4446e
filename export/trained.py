"""Load a finished run back into PyTorch: the NF4 base with its trained adapters.

This is the reference every export is checked against, and the source of
held-out inputs for the parity check (the run's own test split).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from qelalora.base import embedded
from qelalora.base.models import ArchSpec, load_base_model
from qelalora.method.layer import ElaLoRALinear
from qelalora.run.data.records import TaskData, load_task_data
from qelalora.run.folder.adapter_io import load_adapter
from qelalora.run.folder.layout import RunFolder, read_json
from qelalora.run.recipe import Recipe, read_yaml, recipe_from_dict


@dataclass
class TrainedRun:
    run_dir: Path
    recipe: Recipe
    model: torch.nn.Module  # NF4 base + ElaLoRA layers, eval mode, CPU
    spec: ArchSpec
    layers: dict[str, ElaLoRALinear]
    tokenizer: object
    model_path: str
    label_names: list[str] | None = None  # class names in id order, when the training data named its classes

    @property
    def task(self) -> str:
        return self.spec.task

    @cached_property
    def data(self) -> TaskData:
        """The run's data, split and tokenised as in training (once: held-out samples and calibration share it)."""
        return load_task_data(self.recipe.data, self.task, self.tokenizer, self.recipe.model.num_labels)


def load_trained(run_dir: Path) -> TrainedRun:
    from transformers import AutoTokenizer

    folder = RunFolder(run_dir)
    folder.require_trained()
    recipe = recipe_from_dict(read_yaml(folder.recipe), str(folder.recipe))
    torch.manual_seed(recipe.train.seed)
    path = embedded.resolve_model(recipe.model.name)
    model, spec = load_base_model(path, recipe.model.quantize, recipe.model.num_labels, "cpu", recipe.model.trust_remote_code,
                                  task=recipe.model.task)
    layers = load_adapter(model, folder.adapter)
    id2label = read_json(folder.adapter_config).get("id2label")
    names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
    if names:  # class names from the training data
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TrainedRun(run_dir, recipe, model, spec, layers, tokenizer, path, names)


def seeded_sample(items: list, n: int, seed: int = 0) -> list:
    """`n` items drawn at random (seeded), in their original order; all of them when there are no more."""
    if n >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def heldout_examples(run: TrainedRun, limit: int = 32) -> list[dict]:
    """A seeded random sample of up to `limit` tokenised examples of the run's test split (its validation
    split if that is empty): the whole split, not its first rows, speaks for it."""
    data = run.data
    return seeded_sample(data.test or data.val or data.train, limit)


@dataclass
class SavedTokenizer:
    """A run's tokenizer once written to `folder`: its ids, and its files to copy into an export. An export needs
    no more of it after the held-out rows are tokenised, and a 262k-token vocabulary's tokenizer holds ~230 MiB."""

    folder: Path
    pad_token_id: int | None
    eos_token_id: int | None

    def save_pretrained(self, dest: Path) -> None:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for path in self.folder.iterdir():
            shutil.copy2(path, dest / path.name)


def set_tokenizer_aside(run: TrainedRun, folder: Path) -> None:
    """Write the run's tokenizer to `folder` and let go of it (its data is tokenised first: `run.data`)."""
    run.data  # noqa: B018 - tokenised now, while the tokenizer is here
    run.tokenizer.save_pretrained(folder)
    run.tokenizer = SavedTokenizer(Path(folder), run.tokenizer.pad_token_id, run.tokenizer.eos_token_id)
