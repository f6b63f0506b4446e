"""Data read through Hugging Face `datasets`: Parquet / Arrow files, folders of data files, saved datasets, hub names.

`datasets` is an optional extra (`pip install 'qelalora[datasets]'`): it
brings pyarrow and pandas, which the default job does not need. JSONL, CSV and
text files keep their own readers (records.py), which give line-level errors.

Splits: a source that names its own (a hub dataset's train / validation /
test, a folder holding train.jsonl and test.jsonl) keeps them; `data.splits`
maps qelalora's train / val / test to files or to the source's split names.
Labels that are a `ClassLabel` bring their class names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qelalora.base.hub import go_offline_if_unreachable
from qelalora.errors import DataError, UserError

from ..recipe import DataSection

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
HUB_PREFIX = "hf:"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class SourceSplits:
    parts: dict[str, list[dict]]  # qelalora split name -> records; only the splits the data gives
    class_names: list[str] | None = None  # a ClassLabel's names, in id order
    records: list[dict] | None = None  # a datasets source with no splits to keep: all its records


BUILTIN = ("rotten-tomatoes", "python-docs", "python-stdlib")


def is_datasets_source(source: str) -> bool:
    if source in BUILTIN:  # a folder of that name in the working directory does not hide a built-in set
        return False
    path = Path(source)
    return source.startswith(HUB_PREFIX) or path.suffix.lower() in FILE_BUILDERS or path.is_dir()


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("this data source is read with Hugging Face `datasets`; install it with: "
                        "pip install 'qelalora[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _load(source: str):
    """A DatasetDict (several splits) or Dataset from `source`."""
    datasets = _datasets()
    path = Path(source)
    try:
        if source.startswith(HUB_PREFIX):
            name, _, config = source[len(HUB_PREFIX):].partition(":")
            offline = go_offline_if_unreachable(name)
            try:
                return datasets.load_dataset(name, config or None)
            except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
                where = " (offline, and not in the local datasets cache)" if offline else ""
                raise DataError(f"cannot load dataset {name!r}{where}: {str(err).splitlines()[0][:300]}") from None
        if not path.exists():
            raise DataError(f"data source {path} does not exist")
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
                return datasets.load_from_disk(str(path))
            return datasets.load_dataset(str(path))
        return datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types for unreadable data; all mean "bad data"
        raise DataError(f"{source}: cannot read it with `datasets` ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None


def _class_names(dataset, label_field: str) -> list[str] | None:
    feature = dataset.features.get(label_field) if dataset.features else None
    return list(feature.names) if feature is not None and hasattr(feature, "names") else None


def _records(dataset, where: str) -> list[dict]:
    records = dataset.to_list()
    if not records:
        raise DataError(f"{where} holds no examples")
    return records


def _split_of(loaded, split: str, source: str):
    if not hasattr(loaded, "keys"):
        raise DataError(f"{source} has a single split; data.splits can only name files for it, not {split!r}")
    if split not in loaded:
        raise DataError(f"{source} has no split {split!r} (its splits: {', '.join(loaded)})")
    return loaded[split]


def _only_split(loaded, source: str):
    """The one split to use of a source without splits to keep: its train split, or its only one."""
    if not hasattr(loaded, "keys"):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return loaded[next(iter(loaded))]
    raise DataError(f"{source} has no train split (its splits: {', '.join(loaded)}); name one with data.splits.train")


def read_source(section: DataSection) -> list[dict]:
    """All records of a datasets source that has no splits of its own to keep (its train split if it has several)."""
    return _records(_only_split(_load(section.source), section.source), section.source)


def _unlabelled(dataset, label_field: str) -> bool:
    """A split whose labels are all -1: a hub test split with its labels withheld."""
    if label_field not in (dataset.column_names or []) or len(dataset) == 0:
        return False
    return all(v == -1 for v in dataset[label_field])


def given_splits(section: DataSection, read_file) -> SourceSplits:
    """The splits the data names itself (empty parts: none, qelalora splits it). `read_file(section)` reads one
    file with qelalora's own readers."""
    if section.splits:
        parts, names, loaded = {}, None, None
        for ours, theirs in section.splits.items():
            path = Path(theirs)
            if path.suffix.lower() in FILE_BUILDERS or path.is_file():
                if is_datasets_source(theirs):
                    dataset = _load(theirs)
                    names = names or _class_names(dataset, section.label_field)
                    parts[ours] = _records(dataset, theirs)
                else:
                    parts[ours] = read_file(replace(section, source=theirs, splits=None))
            else:
                if not is_datasets_source(section.source):
                    raise DataError(f"data.splits.{ours}: {theirs!r} is not a file, and data.source {section.source!r} "
                                    "has no named splits (give files, or a datasets source: hf:NAME, a folder, .parquet)")
                loaded = loaded if loaded is not None else _load(section.source)
                dataset = _split_of(loaded, theirs, section.source)
                names = names or _class_names(dataset, section.label_field)
                parts[ours] = _records(dataset, f"{section.source} [{theirs}]")
        return SourceSplits(parts, names)
    if not is_datasets_source(section.source):
        return SourceSplits({})
    loaded = _load(section.source)
    if not hasattr(loaded, "keys") or "train" not in loaded or len(loaded) < 2:
        only = _only_split(loaded, section.source)
        return SourceSplits({}, _class_names(only, section.label_field), _records(only, section.source))
    parts, names = {}, None
    for ours, candidates in SPLIT_NAMES.items():
        theirs = next((c for c in candidates if c in loaded and len(loaded[c]) > 0), None)
        if theirs is None or (ours != "train" and _unlabelled(loaded[theirs], section.label_field)):
            continue  # absent, empty, or labels withheld: cut from train instead
        parts[ours] = _records(loaded[theirs], f"{section.source} [{theirs}]")
        names = names or _class_names(loaded[theirs], section.label_field)
    return SourceSplits(parts, names)
