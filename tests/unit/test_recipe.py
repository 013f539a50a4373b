"""The recipe loader: YAML floats, extends, overrides, validation messages."""

import pytest

from llmkit.config import load_recipe, resolve
from llmkit.errors import RecipeError
from llmkit.recipefile import apply_overrides, load_raw, parse_yaml

BASE = """
task: mlm
model: {config: {model_type: bert, hidden_size: 32}}
tokenizer: {train: {type: wordpiece, vocab_size: 500}}
data: {source: pydoc, max_length: 64}
trainer: {output_dir: runs/x, learning_rate: 1e-4, num_train_epochs: 1}
"""


def test_scientific_floats_are_floats():
    data = parse_yaml("a: 1e-4\nb: 5.0e-5\nc: 3\nd: 1E3\ne: '1e-4'\nf: .5")
    assert data == {"a": 1e-4, "b": 5e-5, "c": 3, "d": 1000.0, "e": "1e-4", "f": 0.5}
    assert isinstance(data["a"], float) and isinstance(data["c"], int)


def test_only_true_and_false_are_booleans():
    data = parse_yaml("a: no\nb: yes\nc: true\nd: False\ne: off")
    assert data == {"a": "no", "b": "yes", "c": True, "d": False, "e": "off"}


def test_yaml_syntax_error_has_line_and_column(write):
    path = write("bad.yaml", "task: mlm\ndata:\n  max_length: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:\d+:\d+: YAML syntax error"):
        load_raw(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_raw(tmp_path / "nope.yaml")


def test_non_mapping_recipe(write):
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_raw(write("list.yaml", "- a\n- b\n"))


def test_precedence_extends_file_overrides(write):
    write("base.yaml", BASE)
    write("mid.yaml", "extends: base.yaml\ndata: {max_length: 32}\ntrainer: {num_train_epochs: 2}\n")
    child = write("sub/child.yaml", "extends: ../mid.yaml\ntrainer: {num_train_epochs: 3, seed: 7}\n")
    recipe = load_recipe(child, ["trainer.seed=9", "data.validation_split=0.1"])
    assert recipe.data.max_length == 32  # mid beats base
    assert recipe.trainer["num_train_epochs"] == 3  # child beats mid
    assert recipe.trainer["seed"] == 9  # override beats child
    assert recipe.trainer["learning_rate"] == 1e-4  # inherited, as a float
    assert recipe.data.validation_split == 0.1
    assert recipe.model.config == {"model_type": "bert", "hidden_size": 32}  # deep merge kept base keys


def test_extends_cycle_is_reported(write):
    write("a.yaml", "extends: b.yaml\ntask: mlm\n")
    b = write("b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="extends cycle: b.yaml -> a.yaml -> b.yaml"):
        load_raw(b)
    with pytest.raises(RecipeError, match="extends cycle"):
        load_raw(write("self.yaml", "extends: self.yaml\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_lenght=5", "unknown key 'data.max_lenght' (did you mean 'max_length'?)"),
        ("tokenizr.name_or_path=x", "unknown key 'tokenizr' (did you mean 'tokenizer'?)"),
        ("data.max_length=abc", "data.max_length must be an integer, got 'abc'"),
        ("data.max_length=true", "data.max_length must be an integer, got True"),
        ("data.validation_split=[1]", "data.validation_split must be a number"),
        ("model.trust_remote_code=1", "model.trust_remote_code must be true or false"),
        ("task=mln", "unknown task 'mln' (did you mean 'mlm'?)"),
        ("data.on_bad_rows=explode", "data.on_bad_rows must be error, skip or warn"),
        ("tokenizer.train.type=wordpeice", "did you mean 'wordpiece'?"),
    ],
)
def test_validation_messages_name_the_key(write, override, message):
    path = write("r.yaml", BASE)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["--lr", "3", "lr", "a..b=1", "=3", ".a=1", "a b=1"])
def test_bad_overrides(bad):
    with pytest.raises(RecipeError, match="bad override"):
        apply_overrides({}, [bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(RecipeError, match="not a section"):
        apply_overrides({"data": {"max_length": 3}}, ["data.max_length.x=1"])


def test_overrides_are_yaml_typed_and_create_sections():
    out = apply_overrides({}, ["a.b.c=3e-4", "a.d=[1, 2]", "e=true", "f=hello world", "g="])
    assert out == {"a": {"b": {"c": 3e-4}, "d": [1, 2]}, "e": True, "f": "hello world", "g": None}


def test_missing_task_and_missing_data(write):
    with pytest.raises(RecipeError, match="missing 'task:'"):
        load_recipe(write("a.yaml", "data: {source: pydoc}\n"))
    with pytest.raises(RecipeError, match="name the data"):
        load_recipe(write("b.yaml", "task: mlm\n"))


def test_output_dir_defaults_to_runs_recipe_name(write):
    text = BASE.replace("output_dir: runs/x, ", "")
    assert str(load_recipe(write("mine.yaml", text)).output_dir) == "runs/mine"


def test_trainer_section_builds_training_arguments(write):
    recipe = resolve(load_recipe(write("r.yaml", BASE), ["trainer.bf16=false"]))
    assert recipe.args.learning_rate == 1e-4
    assert recipe.args.output_dir == "runs/x"
    assert recipe.args.bf16 is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.learnig_rate=1", "unknown key 'trainer.learnig_rate' (did you mean 'learning_rate'?)"),
        ("trainer.num_train_epochs=many", "trainer.num_train_epochs must be a number, got 'many'"),
        ("trainer.eval_strategy=sometimes", "trainer: "),
        ("peft.rank=8", "unknown key 'peft.rank'"),
        ("generation.num_beam=2", "unknown key 'generation.num_beam' (did you mean 'num_beams'?)"),
    ],
)
def test_hugging_face_sections_fail_early(write, override, message):
    with pytest.raises(RecipeError) as err:
        resolve(load_recipe(write("r.yaml", BASE), [override]))
    assert message in str(err.value)


def test_first_line_of_any_exception():
    from llmkit.errors import first_line

    assert first_line(ValueError("bad thing\n  long details")) == "bad thing"
    assert first_line(OSError()) == "OSError"  # an empty message never raises while reporting
    assert first_line(RuntimeError("  "), default="") == ""


def test_remote_code_is_off_unless_asked_and_then_named(write, caplog):
    assert load_recipe(write("r.yaml", BASE)).model.trust_remote_code is False
    with caplog.at_level("WARNING", logger="llmkit"):
        resolve(load_recipe(write("r.yaml", BASE), ["model.config=null", "model.name_or_path=acme/odd-model"]))
        assert "trust_remote_code" not in caplog.text
        resolve(
            load_recipe(
                write("r.yaml", BASE),
                ["model.config=null", "model.name_or_path=acme/odd-model", "model.trust_remote_code=true"],
            )
        )
    assert "Python code from 'acme/odd-model' will run on this machine" in caplog.text


# --------------------------------------------------------------------------- shipped recipes by name, from any folder


@pytest.mark.parametrize("name", ["recipes/bert.yaml", "bert.yaml", "bert", "recipes/bert"])
def test_a_shipped_recipe_by_its_path_or_name_from_any_folder(tmp_path, monkeypatch, name, caplog):
    from llmkit.recipefile import find_recipe, shipped_recipes_dir

    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="llmkit"):
        assert find_recipe(name) == shipped_recipes_dir() / "bert.yaml"
    assert caplog.messages == [f"Reading llmkit's shipped recipe {shipped_recipes_dir() / 'bert.yaml'}"]
    recipe = load_recipe(name)
    assert recipe.task == "mlm" and recipe.recipe_file == str(shipped_recipes_dir() / "bert.yaml")
    assert recipe.trainer["output_dir"] == "runs/bert"


def test_a_local_file_of_the_same_path_wins(write, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write("recipes/bert.yaml", BASE)
    with caplog.at_level("INFO", logger="llmkit"):
        assert load_raw("recipes/bert.yaml")["model"]["config"]["hidden_size"] == 32
    assert not caplog.messages


def test_extends_names_a_shipped_recipe_from_anywhere(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write("elsewhere/mine.yaml", "extends: recipes/tiny/gpt2.yaml\ntrainer: {learning_rate: 0.01}\n")
    raw = load_raw(path)
    assert raw["task"] == "clm" and raw["trainer"]["learning_rate"] == 0.01 and raw["data"]["source"] == "pydoc"


@pytest.mark.parametrize("name", ["nothing-like-it", "recipes/../pyproject", "/abs/bert.yaml"])
def test_no_file_and_no_shipped_recipe_is_still_not_found(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"recipe file not found: {name}"):
        load_raw(name)


def test_data_load_and_data_source_replace_each_other(write):
    from conftest import RECIPES

    hub = load_recipe(RECIPES / "gpt2.yaml", ["data.streaming=true", "data.load.path=Salesforce/wikitext"])
    assert hub.data.load == {"path": "Salesforce/wikitext"} and hub.data.source is None
    back = load_recipe(RECIPES / "gpt2.yaml", ["data.load.path=x", "data.source=pydoc"])
    assert back.data.source == "pydoc" and back.data.load is None
    write("parent.yaml", "task: clm\nmodel: {config: {model_type: gpt2}}\ndata: {source: pydoc, max_length: 64}\n")
    child = load_recipe(write("child.yaml", "extends: parent.yaml\ndata: {load: {path: text}}\n"))
    assert child.data.load == {"path": "text"} and child.data.source is None and child.data.max_length == 64
    with pytest.raises(RecipeError, match="not both"):  # named together in one place: still a mistake
        load_recipe(
            write(
                "both.yaml",
                "task: clm\nmodel: {config: {model_type: gpt2}}\ndata: {source: pydoc, load: {path: text}}\n",
            )
        )
