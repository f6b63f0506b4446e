"""The examples `qelalora eval` scores an export on: the run's own data by default, or other data (torch-free)."""

from __future__ import annotations

from pathlib import Path

from qelalora.errors import UserError
from qelalora.run.data.records import BUILTIN, load_task_data
from qelalora.run.data.sources import HUB_PREFIX
from qelalora.run.recipe import DataSection

SPLITS = ("test", "val", "train")


def evaluation_examples(model, data: str | None, split: str) -> list[dict]:
    """`split` of `data` (default: the data the run trained on), split and tokenised as training did."""
    if split not in SPLITS:
        raise UserError(f"--split must be test, val or train, got {split!r}")
    section = DataSection(**model.info["data"])
    if data is not None:
        section.source, section.splits = data, None  # the recipe's split files belong to its own data
    elif not (section.source in BUILTIN or section.source.startswith(HUB_PREFIX) or Path(section.source).exists()):
        # an export names its data by file name only (no paths of the machine that wrote it)
        raise UserError(f"this export was trained on {section.source}; pass --data PATH to that file (or to other data)")
    return getattr(load_task_data(section, model.task, model.tokenizer, model.info.get("num_labels") or 2), split)
