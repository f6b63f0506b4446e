"""Examples: read data files, split them reproducibly, tokenise them. No torch here.

Used by training and by the ONNX Runtime edge path (which must not import torch).

Sources: JSONL, CSV and plain-text files, the built-in sets of
`qelalora.base.embedded` (Rotten Tomatoes; Python docs; Python stdlib source),
and whatever Hugging Face `datasets` reads (sources.py).

Splits the data names itself (`data.splits`, or a datasets source's own) are
kept; a held-out split they leave out is cut from train. Otherwise splits are
fixed by `data.split_seed`: examples (or, for running text, documents) are
shuffled with Python's seeded `random.Random`, then the first `test_size`
become the test set, the next `val_size` the validation set, the rest
training data. Running text is tokenised in that document order, joined with
EOS and cut into `max_length` blocks; the split is then made over blocks.

Causal-LM examples are running text, prompt + completion (loss on the
completion), or chat `messages` (loss on the assistant turns, chat.py);
`data.packing` packs them into full blocks.

Token ids are kept as 32-bit `array`s, not lists of Python ints: a token
costs 4 bytes instead of about 36, which is most of the data's memory in a
run (Rotten Tomatoes 1.4 MB instead of ~27 MB; 20,000 SmolLM2 blocks 10 MB
instead of ~94 MB) and lets the memory plan count it.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from array import array
from dataclasses import dataclass, replace
from pathlib import Path

from qelalora.base import embedded
from qelalora.errors import DataError

from ..recipe import DataSection
from . import sources
from .chat import chat_examples, pack

BUILTIN = sources.BUILTIN
MAX_FIELD_CHARS = 1_000_000
csv.field_size_limit(MAX_FIELD_CHARS)


@dataclass
class TaskData:
    task: str
    train: list[dict]
    val: list[dict]
    test: list[dict]
    pad_id: int
    label_names: list[str] | None = None  # id -> name, when the data labels classes by name

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataError(f"{path}, line {i}: not valid JSON ({str(err)[:120]})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {i}: each line must be a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _read_csv(path: Path) -> list[dict]:
    try:
        return list(csv.DictReader(io.StringIO(_read_text(path))))
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from None


# class names of the built-in labelled sets, in id order (they go into the exported config's id2label)
BUILTIN_CLASS_NAMES = {"rotten-tomatoes": ["negative", "positive"]}


def rotten_tomatoes() -> list[dict]:
    """12,808 review snippets: label 1 = fresh, 0 = rotten (plot summaries dropped)."""
    with bz2.open(embedded.rotten_tomatoes_file(), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"text": r["text"], "label": int(r["category"] == "fresh")} for r in rows if r["category"] != "plot"]


def read_records(section: DataSection) -> list[dict]:
    """Raw records (dicts) from the configured source."""
    source = section.source
    if source == "rotten-tomatoes":
        return rotten_tomatoes()
    if source in ("python-docs", "python-stdlib"):
        files = embedded.python_doc_files() if source == "python-docs" else embedded.python_stdlib_files()
        return [{section.text_field: f.read_text(encoding="utf-8", errors="replace")} for f in files]
    if sources.is_datasets_source(source):
        return sources.read_source(section)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data file {path} does not exist (built-in sets: {', '.join(BUILTIN)})")
    if not path.is_file():
        raise DataError(f"data source {path} is not a file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix in (".txt", ".text", ".md", ".rst"):
        records = [{section.text_field: _read_text(path)}]
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv, .txt, .parquet or .arrow")
    if not records or not any(records):
        raise DataError(f"{path} holds no examples")
    return records


def _count(size: int | float, n: int) -> int:
    return int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)


def _shuffled(items: list, seed: int) -> list:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


def _split(items: list, section: DataSection) -> tuple[list, list, list]:
    shuffled = _shuffled(items, section.split_seed)
    n_test = min(_count(section.test_size, len(items)), len(items) // 3)
    n_val = min(_count(section.val_size, len(items)), len(items) // 3)
    test, val, train = shuffled[:n_test], shuffled[n_test : n_test + n_val], shuffled[n_test + n_val :]
    if section.max_train_examples is not None:
        train = train[: section.max_train_examples]
    return train, val, test


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise DataError(f"{where}: field {name!r} is missing (fields present: {', '.join(map(str, record))[:200]})")
    return record[name]


def _as_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected text, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _is_index(value) -> bool:
    return isinstance(value, (bool, int)) or (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and value.strip().lstrip("-").isdigit())


def label_names_of(records: list[dict], section: DataSection, num_labels: int, given: list[str] | None = None) -> list[str] | None:
    """Class names in id order when the data names its classes (text labels, or `given` by a `datasets`
    ClassLabel); None for bare integer labels."""
    values = [r.get(section.label_field) for r in records if isinstance(r, dict)]
    named = sorted({v for v in values if isinstance(v, str) and not _is_index(v)})
    if section.label_names is None and not named and not given:
        return None
    names = list(section.label_names) if section.label_names is not None else (list(given) if given else named)
    unknown = [v for v in named if v not in names]
    if unknown:
        raise DataError(f"{section.source}: label(s) {', '.join(map(repr, unknown[:5]))} are not in data.label_names {names}")
    if len(set(names)) != len(names) or len(names) != num_labels:
        raise DataError(
            f"{section.source}: {len(set(names))} class name(s) ({', '.join(names[:10])}) but model.num_labels is {num_labels}; "
            f"set model.num_labels: {len(set(names))} (or list the classes in data.label_names)"
        )
    return names


def _as_label(value, num_labels: int, where: str, ids: dict[str, int] | None = None) -> int:
    if ids and isinstance(value, str) and value in ids:
        return ids[value]
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DataError(f"{where}: label {str(value)[:40]!r} is not an integer class index or a class name")
    if not 0 <= value < num_labels:
        raise DataError(f"{where}: label {value} is outside 0..{num_labels - 1}; set model.num_labels to match the data")
    return value


def classification_examples(records: list[dict], section: DataSection, tokenizer, num_labels: int,
                            names: list[str] | None = None) -> list[dict]:
    if not records:  # an empty held-out split (data.test_size: 0): tokenizers reject an empty batch
        return []
    texts, labels = [], []
    ids = {n: i for i, n in enumerate(names)} if names else None
    for i, r in enumerate(records, 1):
        where = f"{section.source}, example {i}"
        texts.append(_as_text(_field(r, section.text_field, where), where))
        labels.append(_as_label(_field(r, section.label_field, where), num_labels, where, ids))
    ids = tokenizer(texts, truncation=True, max_length=section.max_length)["input_ids"]
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels)]


def completion_examples(records: list[dict], section: DataSection, tokenizer) -> list[dict]:
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, r in enumerate(records, 1):
        where = f"{section.source}, example {i}"
        prompt = tokenizer(_as_text(_field(r, section.prompt_field, where), where))["input_ids"]
        completion = tokenizer(_as_text(_field(r, section.completion_field, where), where), add_special_tokens=False)["input_ids"]
        ids = (prompt + completion + eos)[: section.max_length]
        labels = ([-100] * len(prompt) + completion + eos)[: section.max_length]
        if all(label == -100 for label in labels[1:]):
            continue  # the prompt alone fills max_length (the first label is never predicted): nothing to learn
        out.append({"input_ids": ids, "labels": labels})
    return out


def text_blocks(documents: list[str], tokenizer, max_length: int) -> list[dict]:
    eos = tokenizer.eos_token_id
    stream = array("i")
    for doc in documents:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // max_length
    return [{"input_ids": stream[i * max_length : (i + 1) * max_length]} for i in range(n)]


def _is_chat(records: list[dict], section: DataSection) -> bool:
    return not section.prompt_field and any(isinstance(r.get(section.messages_field), list) for r in records[:100])


def _tokeniser(task: str, section: DataSection, tokenizer, num_labels: int, names, chat: bool):
    """records -> examples, for everything but running text."""
    if task == "seq-cls":
        return lambda part: classification_examples(part, section, tokenizer, num_labels, names)
    if chat:
        return lambda part: chat_examples(part, section, tokenizer)
    return lambda part: completion_examples(part, section, tokenizer)


def _documents(records: list[dict], section: DataSection) -> list[str]:
    return [_as_text(_field(r, section.text_field, section.source), section.source) for r in records]


def _cut(items: list, section: DataSection, need_val: bool, need_test: bool) -> tuple[list, list, list]:
    """The held-out splits the data did not give, cut from its train split by the seeded split's rule."""
    return _split(items, replace(section, val_size=section.val_size if need_val else 0,
                                 test_size=section.test_size if need_test else 0, max_train_examples=None))


def load_task_data(section: DataSection, task: str, tokenizer, num_labels: int = 2) -> TaskData:
    """Read, split and tokenise the data for `task` ("seq-cls" or "causal-lm")."""
    given = sources.given_splits(section, read_records)
    records = [r for part in given.parts.values() for r in part] if given.parts else (given.records or read_records(section))
    class_names = given.class_names or BUILTIN_CLASS_NAMES.get(section.source)
    names = label_names_of(records, section, num_labels, class_names) if task == "seq-cls" else None
    chat = _is_chat(records, section)
    running_text = task == "causal-lm" and not section.prompt_field and not chat
    if given.parts:
        if running_text:
            parts = {k: text_blocks(_documents(v, section), tokenizer, section.max_length) for k, v in given.parts.items()}
        else:
            tokenise = _tokeniser(task, section, tokenizer, num_labels, names, chat)
            parts = {k: tokenise(v) for k, v in given.parts.items()}
        train, val, test = parts["train"], parts.get("val", []), parts.get("test", [])
        if "val" not in parts or "test" not in parts:
            train, cut_val, cut_test = _cut(train, section, "val" not in parts, "test" not in parts)
            val, test = (val if "val" in parts else cut_val), (test if "test" in parts else cut_test)
        if section.max_train_examples is not None:
            train = train[: section.max_train_examples]
    elif not running_text:
        tokenise = _tokeniser(task, section, tokenizer, num_labels, names, chat)
        train, val, test = (tokenise(part) for part in _split(records, section))
    else:
        blocks = text_blocks(_documents(_shuffled(records, section.split_seed), section), tokenizer, section.max_length)
        n_test = min(_count(section.test_size, len(blocks)), len(blocks) // 3)
        n_val = min(_count(section.val_size, len(blocks)), len(blocks) // 3)
        test, val, train = blocks[:n_test], blocks[n_test : n_test + n_val], blocks[n_test + n_val :]
        if section.max_train_examples is not None:
            train = train[: section.max_train_examples]
    if section.packing and task == "causal-lm" and not running_text:
        train, val, test = (pack(part, section.max_length) for part in (train, val, test))
    if not train:
        raise DataError(
            f"{section.source}: no training examples left after splitting "
            f"(for running text, is it shorter than one block of {section.max_length} tokens?)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TaskData(task, compact(train), compact(val), compact(test), pad, names)


def compact(examples: list[dict]) -> list[dict]:
    """Token id and label sequences as 32-bit arrays (4 bytes a token instead of a Python int's ~36)."""
    return [{k: array("i", v) if isinstance(v, list) else v for k, v in e.items()}
            for e in examples]
