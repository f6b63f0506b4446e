"""Data through Hugging Face `datasets` (Parquet, folders of split files, saved datasets), named splits, class
names, chat records with the loss on assistant turns, and packing."""

import json
from pathlib import Path

import pytest

from qelalora.errors import DataError
from qelalora.run.data.chat import IGNORE, pack
from qelalora.run.data.records import load_task_data
from qelalora.run.recipe import DataSection
from tests.cli_helpers import NEGATIVE, POSITIVE, run_cli, write_recipe
from tests.conftest import tiny_tokenizer

datasets = pytest.importorskip("datasets")

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def _reviews(n: int, offset: int = 0) -> list[dict]:
    return [{"text": (POSITIVE if i % 2 else NEGATIVE)[i % 4], "sentiment": "fresh" if i % 2 else "rotten"}
            for i in range(offset, offset + n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_a_parquet_file_with_class_names_is_split_by_seed(tmp_path, tok):
    path = tmp_path / "reviews.parquet"
    datasets.Dataset.from_list(_reviews(60)).to_parquet(str(path))
    section = DataSection(source=str(path), label_field="sentiment", val_size=10, test_size=5)
    data = load_task_data(section, "seq-cls", tok)
    assert data.sizes() == {"train": 45, "val": 10, "test": 5}
    assert data.label_names == ["fresh", "rotten"]  # sorted names -> ids 0, 1
    assert {e["labels"] for e in data.train} == {0, 1}


def test_a_folder_of_split_files_keeps_its_splits(tmp_path, tok):
    folder = tmp_path / "reviews"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _reviews(40))
    _write_jsonl(folder / "validation.jsonl", _reviews(7, 40))
    _write_jsonl(folder / "test.jsonl", _reviews(9, 47))
    data = load_task_data(DataSection(source=str(folder), label_field="sentiment"), "seq-cls", tok)
    assert data.sizes() == {"train": 40, "val": 7, "test": 9}  # as given: no seeded re-split


def test_split_files_by_name_and_a_missing_split_cut_from_train(tmp_path, tok):
    train = _write_jsonl(tmp_path / "train.jsonl", _reviews(50))
    test = tmp_path / "held.csv"
    test.write_text("text,sentiment\n" + "".join(f"{r['text']},{r['sentiment']}\n" for r in _reviews(8, 50)))
    section = DataSection(source="unused", splits={"train": str(train), "test": str(test)}, label_field="sentiment", val_size=6)
    data = load_task_data(section, "seq-cls", tok)
    assert data.sizes() == {"train": 44, "val": 6, "test": 8}


def test_a_saved_dataset_with_a_class_label_and_named_splits(tmp_path, tok):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos", "mixed"])})
    rows = [{"text": r["text"], "label": i % 3} for i, r in enumerate(_reviews(30))]
    saved = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows, features=features),
        "dev": datasets.Dataset.from_list(rows[:6], features=features),
    })
    saved.save_to_disk(str(tmp_path / "saved"))
    section = DataSection(source=str(tmp_path / "saved"), splits={"train": "train", "val": "dev"}, test_size=0)
    data = load_task_data(section, "seq-cls", tok, num_labels=3)
    assert data.label_names == ["neg", "pos", "mixed"]  # the ClassLabel's order, not sorted
    assert data.sizes() == {"train": 30, "val": 6, "test": 0}
    with pytest.raises(DataError, match="has no split 'validation' \\(its splits: train, dev\\)"):
        load_task_data(DataSection(source=str(tmp_path / "saved"), splits={"train": "train", "val": "validation"}),
                       "seq-cls", tok, num_labels=3)
    with pytest.raises(DataError, match="3 class name\\(s\\).*model.num_labels is 2"):
        load_task_data(section, "seq-cls", tok, num_labels=2)


def _chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "add a and b"},
                          {"role": "assistant", "content": f"def add(a, b): return a + b {i % 3}"},
                          {"role": "user", "content": "thanks"},
                          {"role": "assistant", "content": "lovely"}]} for i in range(n)]


def test_chat_records_learn_only_the_assistant_turns(tmp_path, tok):
    tok.chat_template = CHAT_TEMPLATE
    path = _write_jsonl(tmp_path / "chat.jsonl", _chats(20))
    data = load_task_data(DataSection(source=str(path), max_length=64, val_size=2, test_size=2), "causal-lm", tok)
    example = data.train[0]
    learned = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])
    assert "def add" in learned and "lovely" in learned
    assert "add a and b" not in learned and "thanks" not in learned and "<user>" not in learned
    assert learned.count("[EOS]") == 2  # each assistant turn's end-of-turn token is learned, the user turns' are not
    assert tok.decode(example["input_ids"]).count("[EOS]") == 4
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        load_task_data(DataSection(source=str(path)), "causal-lm", tok)


def test_packing_fills_blocks_and_keeps_the_labels(tmp_path, tok):
    examples = [{"input_ids": [5] * 7, "labels": [IGNORE] * 3 + [5] * 4} for _ in range(10)]
    blocks = pack(examples, 16)
    assert [len(b["input_ids"]) for b in blocks] == [16, 16, 16, 16, 6]
    assert sum(label != IGNORE for b in blocks for label in b["labels"]) == 40
    tok.chat_template = CHAT_TEMPLATE
    path = _write_jsonl(tmp_path / "chat.jsonl", _chats(30))
    section = DataSection(source=str(path), max_length=32, val_size=2, test_size=2, packing=True)
    packed = load_task_data(section, "causal-lm", tok)
    assert all(len(e["input_ids"]) == 32 for e in packed.train[:-1])
    tok.chat_template = None


def test_datasets_source_errors_are_one_paragraph(tmp_path, tok):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: cannot read it with `datasets`"):
        load_task_data(DataSection(source=str(bad)), "seq-cls", tok)
    with pytest.raises(DataError, match="not a file, and data.source 'rotten-tomatoes' has no named splits"):
        load_task_data(DataSection(splits={"train": "train"}), "seq-cls", tok)


@pytest.mark.slow
def test_readme_recipe_a_datasets_folder_with_string_labels_trains(tmp_path, tiny_bert_dir, capsys):
    folder = tmp_path / "reviews"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _reviews(64))
    _write_jsonl(folder / "validation.jsonl", _reviews(8, 64))
    _write_jsonl(folder / "test.jsonl", _reviews(8, 72))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert_dir, folder, train={"steps": 16, "checkpoint_every": 0})
    recipe.write_text(recipe.read_text().replace("max_length: 24", "label_field: sentiment\n  max_length: 24"))
    code, out, err = run_cli(capsys, "train", "-r", str(recipe), "-o", str(tmp_path / "run"), "--no-progress")
    assert code == 0, err
    assert "64 train / 8 val / 8 test" in out
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["id2label"] in ({"0": "fresh", "1": "rotten"}, ["fresh", "rotten"])


def test_a_hub_dataset_offline_fails_at_once_with_one_paragraph(tok):
    with pytest.raises(DataError, match="cannot load dataset 'someone/reviews' \\(offline, and not in the local datasets cache\\)"):
        load_task_data(DataSection(source="hf:someone/reviews"), "seq-cls", tok)


def test_single_split_sources_bring_class_names_and_withheld_test_labels_are_cut_from_train(tmp_path, tok):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = [{"text": r["text"], "label": i % 2} for i, r in enumerate(_reviews(40))]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "one"))
    data = load_task_data(DataSection(source=str(tmp_path / "one"), val_size=4, test_size=4), "seq-cls", tok)
    assert data.label_names == ["neg", "pos"] and data.sizes() == {"train": 32, "val": 4, "test": 4}
    hidden = [{**r, "label": -1} for r in rows[:10]]  # a hub-style test split with its labels withheld
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=features),
                          "test": datasets.Dataset.from_list(hidden, features=features)}).save_to_disk(str(tmp_path / "two"))
    data = load_task_data(DataSection(source=str(tmp_path / "two"), val_size=4, test_size=6), "seq-cls", tok)
    assert data.sizes() == {"train": 30, "val": 4, "test": 6}  # test cut from train, not the unlabelled split


def test_a_conversation_opening_with_the_assistant_does_not_learn_the_template_header(tmp_path, tok):
    tok.chat_template = ("<system> be brief [EOS] {% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [EOS] {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "lovely warm film"},
                                                                {"role": "user", "content": "thanks"}]}] * 10)
    data = load_task_data(DataSection(source=str(path), max_length=64, val_size=1, test_size=1), "causal-lm", tok)
    learned = tok.decode([t for t, label in zip(data.train[0]["input_ids"], data.train[0]["labels"]) if label != IGNORE])
    assert "lovely warm film" in learned and "brief" not in learned and "thanks" not in learned
    tok.chat_template = None
