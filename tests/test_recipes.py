import pytest

from qelalora.errors import RecipeError
from qelalora.run.recipe import apply_overrides, load_recipe, load_recipe_raw, recipe_from_dict, shipped_recipes

LLAMA = {"llama-3.2-1b", "llama-3.1-8b", "tinyllama-1.1b", "smollm2-135m-python-docs"}
BERT = {"bert-base-uncased", "distilbert-base-uncased", "roberta-base", "deberta-v3-base", "minilm-l6-rotten-tomatoes"}


def test_every_shipped_recipe_validates_and_says_how_to_run_it():
    shipped = shipped_recipes()
    assert set(shipped) == LLAMA | BERT
    for name, path in shipped.items():
        recipe = load_recipe(name)
        assert recipe.description
        header = path.read_text().splitlines()[:12]
        assert any(line.startswith("# Run:") for line in header), name
        assert f"-r {name}" in path.read_text() or name == "minilm-l6-rotten-tomatoes"


def test_default_recipe_is_the_embedded_minilm_job():
    recipe = load_recipe(None)
    assert recipe.model.name == "embedded:minilm-l6" and recipe.model.quantize == "nf4"
    assert recipe.data.source == "rotten-tomatoes" and recipe.elalora.budget_mb == 512


def test_the_default_jobs_classes_have_names():
    """Rotten Tomatoes' labels are 0 = rotten, 1 = fresh: the exported config's id2label says negative / positive."""
    from qelalora.run.data.records import load_task_data
    from tests.conftest import tiny_tokenizer

    section = load_recipe(None).data
    section.max_train_examples = 20
    data = load_task_data(section, "seq-cls", tiny_tokenizer(128), 2)
    assert data.label_names == ["negative", "positive"]
    assert {e["labels"] for e in data.test} == {0, 1}


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"quantize": "int3"}, "train": {"steps": 0, "lr": "x"}, "elalora": {"k": 0}, "data": 5})
    text = str(err.value)
    assert "data: expected a mapping" in text and "train.lr: expected float" in text
    # range checks run once the types are right
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"quantize": "int3"}, "train": {"steps": 0}, "elalora": {"k": 0}})
    assert "3 problem(s)" in str(err.value)


def test_overrides_are_typed_and_reject_bad_shapes():
    raw, _ = load_recipe_raw(None)
    merged = apply_overrides(raw, ["train.lr=1e-4", "elalora.rank=4", "model.targets=[query, value]", "train.device=cpu"])
    recipe = recipe_from_dict(merged)
    assert recipe.train.lr == 1e-4 and recipe.elalora.rank == 4 and recipe.model.targets == ["query", "value"]
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides(raw, ["lr=3"])


def test_non_finite_and_bool_values_are_rejected():
    with pytest.raises(RecipeError, match="train.lr"):
        recipe_from_dict({"train": {"lr": float("nan")}})
    with pytest.raises(RecipeError, match="train.steps"):
        recipe_from_dict({"train": {"steps": True}})


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(evil))
