"""Hostile and broken inputs never traceback: a valid recipe, or one line naming the problem and the fix (exit 2).

Property tests (hypothesis) feed the recipe loader random YAML documents and override strings; the data
tests feed the loaders binary, non-UTF-8, ragged, tiny, huge and mistyped files through a dry run.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, RECIPES, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmkit import engine
from llmkit.cli import app
from llmkit.config import load_recipe, resolve
from llmkit.errors import DataError, LlmkitError, RecipeError
from llmkit.recipe import Recipe
from llmkit.recipefile import load_raw, parse_yaml

# --------------------------------------------------------------------------- the property

_FILE = Path(tempfile.gettempdir()) / "recipe.yaml"  # replaced by a pytest temporary file in _warm


def _outcome(text: str | bytes, overrides: list[str] = ()) -> Recipe | LlmkitError:
    """Load and resolve `text` as a recipe file: a Recipe, or the LlmkitError (one non-empty line) it raised.

    Any other exception propagates and fails the test: it would be a traceback (exit 1) for the user.
    """
    if isinstance(text, bytes):
        _FILE.write_bytes(text)
    else:
        _FILE.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        recipe = resolve(load_recipe(_FILE, list(overrides)))
    except LlmkitError as e:
        message = str(e)
        assert message.strip(), f"empty message from {type(e).__name__}"
        assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
        return e
    assert isinstance(recipe, Recipe) and recipe.args is not None
    return recipe


# The tiny classification recipe with its relative paths made absolute, so that it loads from any folder.
_BASE = parse_yaml((RECIPES / "tiny" / "classification.yaml").read_text())
_BASE["extends"] = str(RECIPES / "classification.yaml")
for _split in ("train", "validation", "test"):
    _BASE["data"][_split] = str(ROOT / _BASE["data"][_split])
_BASE_TEXT = yaml.safe_dump(_BASE)

_SPECIAL = [
    "[",
    "{",
    "]",
    "}",
    "!!python/object:os.system",
    "!!python/name:os.system",
    "*alias",
    "&anchor",
    "&a [*a]",
    "!!binary x",
    "!!timestamp 2020-13-45",
    "2020-02-30",
    "!!int x",
    "!!float x",
    "!!set {a}",
    "? a",
    "|",
    ">",
    "%YAML 1.1",
    "---",
    "...",
    ".nan",
    "-.inf",
    "1e400",
    "0x1F",
    "~",
    "@x",
    "`x",
    "'",
    '"',
    "[" * 300,
    "{a: " * 200,
    "\x00",
    "\t",
    "no",
    "epoch",
    "runs/x",
    "",
]
_KEYS = [
    "task",
    "description",
    "extends",
    "model",
    "model.name_or_path",
    "model.config",
    "model.config.hidden_size",
    "model.quantization",
    "tokenizer",
    "tokenizer.train",
    "tokenizer.train.vocab_size",
    "tokenizer.train.type",
    "data",
    "data.load",
    "data.load.path",
    "data.source",
    "data.train",
    "data.validation",
    "data.columns",
    "data.columns.text",
    "data.max_length",
    "data.validation_split",
    "data.on_bad_rows",
    "data.num_proc",
    "options",
    "options.labels",
    "options.problem_type",
    "options.threshold",
    "trainer",
    "trainer.output_dir",
    "trainer.learning_rate",
    "trainer.num_train_epochs",
    "trainer.eval_strategy",
    "trainer.report_to",
    "trainer.lr_scheduler_kwargs",
    "trainer.accelerator_config",
    "trainer.deepspeed",
    "trainer.fsdp_config",
    "trainer.label_names",
    "peft",
    "peft.r",
    "peft.target_modules",
    "peft.lora_alpha",
    "generation",
    "generation.num_beams",
    "generation.max_new_tokens",
    "generation.watermarking_config",
    "metrics",
]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-2, 300),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(_SPECIAL),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=4)
    ),
    max_leaves=10,
)


def _replace(doc: dict, key: str, value: object) -> dict:
    node = doc
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return doc


def _apply(changes: list[tuple[str, object]]) -> dict:
    doc = parse_yaml(_BASE_TEXT)
    for key, value in changes:
        _replace(doc, key, value)
    return doc


_mutated = st.lists(st.tuples(st.sampled_from(_KEYS), _values), min_size=1, max_size=3).map(_apply)

# `make test` (and CI) draws the same examples every run, so a failure reproduces and a run never fails by
# chance; `make fuzz` (LLMKIT_FUZZ=N) explores N fresh random examples per property instead.
_FUZZ = int(os.environ.get("LLMKIT_FUZZ", "0"))
_PROPERTY = settings(
    max_examples=_FUZZ or 120,
    deadline=None,
    database=None,
    derandomize=not _FUZZ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_MANY = _FUZZ or 250


@pytest.fixture(scope="module", autouse=True)
def _warm(tmp_path_factory):
    """A file for the examples to write, and torch and transformers imported once, outside any example's clock."""
    global _FILE
    _FILE = tmp_path_factory.mktemp("hostile") / "recipe.yaml"
    assert isinstance(_outcome(_BASE_TEXT), Recipe)


@_PROPERTY
@given(_values)
def test_any_yaml_document_is_a_recipe_or_one_line(doc):
    _outcome(yaml.safe_dump(doc, allow_unicode=True))


@_PROPERTY
@given(st.text() | st.binary())
def test_any_text_or_bytes_is_a_recipe_or_one_line(text):
    _outcome(text)


@settings(_PROPERTY, max_examples=_MANY)
@given(_mutated)
def test_a_shipped_recipe_with_random_values_is_a_recipe_or_one_line(doc):
    _outcome(yaml.safe_dump(doc, allow_unicode=True))


_override = st.one_of(
    st.text(max_size=30),  # mostly no '=': malformed
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KEYS), st.sampled_from(_SPECIAL) | st.text(max_size=20)),
    st.builds(lambda k, v: f"{k}={v}", st.text(max_size=15), st.text(max_size=15)),
    st.builds(
        lambda ks, v: f"{'.'.join(ks)}={v}",
        st.lists(st.sampled_from(["a", "data", "trainer", "x_1"]), max_size=40),
        st.sampled_from(_SPECIAL),
    ),
    st.sampled_from(["=", "=3", ".=1", "a..b=1", "a.=1", "--lr", "trainer.seed", "data.train==x", "task=mlm=clm"]),
)


@settings(_PROPERTY, max_examples=_MANY)
@given(st.lists(_override, max_size=4))
def test_any_overrides_give_a_recipe_or_one_line(overrides):
    _outcome(_BASE_TEXT, overrides)


def test_the_base_recipe_and_its_overrides_still_load():
    """The property is not vacuous: valid documents and overrides give a Recipe."""
    recipe = _outcome(_BASE_TEXT, ["trainer.learning_rate=3e-4", "data.max_length=16", "peft.r=4"])
    assert isinstance(recipe, Recipe)
    assert recipe.args.learning_rate == 3e-4 and recipe.data.max_length == 16 and recipe.lora.r == 4


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[" * 5000, [], "nested too deeply"),
        ("- " * 200 + "x", [], "nested too deeply"),
        ("a: &x [*x]\n", [], "a YAML alias refers to itself"),
        (
            "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
            [],
            "expands to over 100,000 values",
        ),
        (
            "task: classification\ndescription: 2020-13-45\n",
            [],
            "YAML value error: month must be in 1..12; quote the value",
        ),
        ("task: !!int x\n", [], "YAML value error"),
        (b"task: caf\xe9\n", [], "is not UTF-8 text (byte 0xe9 at offset 9)"),
        ("task: [classification]\n", [], "unknown task ['classification']"),
        (_BASE_TEXT, ["generation.1=2"], "unknown key 'generation.1'"),
        (_BASE_TEXT, ["generation.watermarking_config=[1]"], "generation: a value has the wrong shape"),
        (_BASE_TEXT, ["trainer.accelerator_config=''"], "trainer: cannot read ''"),
        (_BASE_TEXT, ["trainer.report_to=[1]"], "trainer.report_to must be a string or a list of strings, got [1]"),
        (_BASE_TEXT, ["trainer.learning_rate=.nan"], "trainer.learning_rate must be a finite number, got nan"),
        (_BASE_TEXT, ["options.threshold=.inf"], "options.threshold must be a finite number, got inf"),
        (_BASE_TEXT, ["data="], "data must be a mapping (key: value), got None"),
        (_BASE_TEXT, ["data.columns.text=[1]"], "'data.columns.text' must be a column name (a string)"),
        (_BASE_TEXT, ["trainer.output_dir="], "trainer.output_dir must name a folder"),
        ("extends: " + "x" * 5000 + "\n", [], "bad recipe path"),
        ('extends: "a\\0b.yaml"\n', [], "a\\x00b.yaml' (extends: in "),
        (
            _BASE_TEXT,
            ["data.max_length=" + "9" * 5000],
            "override data.max_length: YAML value error: Exceeds the limit",
        ),
    ],
)
def test_hostile_recipes_found_by_fuzzing(text, overrides, message):
    """Each of these raised something other than an LlmkitError (a traceback) before."""
    err = _outcome(text, overrides)
    assert isinstance(err, RecipeError) and message in str(err), err
    assert len(str(err)) < 400


# --------------------------------------------------------------------------- the command line

runner = CliRunner()


@pytest.mark.parametrize(
    "content",
    [
        "[" * 5000,
        "a: &x [*x]\n",
        "task: !!python/object:os.system x\n",
        "task: [1]\n",
        b"\x00\xff\xfe binary \x00",
        "extends: recipe.yaml\ntask: mlm\n",
        "task: classification\ntrainer: {output_dir: '.'}\ndata: {train: x.jsonl}\n",
    ],
)
def test_cli_recipe_show_exits_2_with_one_line(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = runner.invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output


def test_cli_dry_run_on_a_binary_data_file_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "train.csv"
    data.write_bytes(bytes(range(256)) * 4)
    args = ["finetune", "recipes/tiny/classification.yaml", f"data.train={data}", "data.validation=null"]
    result = runner.invoke(app, [*args, "data.test=null", f"trainer.output_dir={tmp_path / 'out'}", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert (
        result.stderr
        == f"error: {data} (data.train) looks binary (it has NUL bytes), not CSV text; point data.train at a UTF-8 file\n"
    )


def test_cli_dry_run_on_a_malformed_json_lines_file_exits_2_with_one_line(tmp_path, monkeypatch):
    """The loader's own "Failed to load JSON ..." log line is not printed next to llmkit's."""
    monkeypatch.chdir(ROOT)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine", "label": "positive"}\n{"text": "broken", "label": positive}\n')
    args = ["finetune", "recipes/tiny/classification.yaml", f"data.train={data}", "data.validation=null"]
    result = runner.invoke(app, [*args, "data.test=null", f"trainer.output_dir={tmp_path / 'out'}", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert (
        result.stderr
        == f"error: {data} (data.train), line 2: invalid JSON (Expecting value); JSON Lines has one object per line\n"
    )


# --------------------------------------------------------------------------- recipes that extend themselves


def test_a_recipe_that_extends_itself(write):
    path = write("self.yaml", "extends: self.yaml\ntask: mlm\n")
    with pytest.raises(RecipeError) as err:
        load_raw(path)
    assert str(err.value) == (
        f"{path}: extends cycle: self.yaml -> self.yaml; a recipe cannot extend itself: remove `extends: self.yaml` from self.yaml"
    )
    write("a.yaml", "extends: ./b.yaml\n")
    write("b.yaml", "extends: [./a.yaml]\n")
    with pytest.raises(RecipeError, match=r"extends cycle: a.yaml -> b.yaml -> a.yaml; remove one of these extends"):
        load_raw(path.parent / "a.yaml")


# --------------------------------------------------------------------------- hostile data files


@pytest.fixture(autouse=False)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tiny recipes name their fixtures relative to the repository root


def _recipe(name: str, tmp_path: Path, *overrides: str) -> Recipe:
    return resolve(
        load_recipe(RECIPES / "tiny" / f"{name}.yaml", [f"trainer.output_dir={tmp_path / 'out'}", *overrides])
    )


def _dry(name: str, tmp_path: Path, *overrides: str) -> dict:
    return engine.train(_recipe(name, tmp_path, *overrides), dry_run=True)


def _only_train(path: Path) -> list[str]:
    return [f"data.train={path}", "data.validation=null", "data.test=null"]


def _fails(name: str, tmp_path: Path, *overrides: str) -> str:
    """The one-line DataError a dry run of the tiny recipe gives."""
    with pytest.raises(DataError) as err:
        _dry(name, tmp_path, *overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


_TASK_OF = {"txt": "gpt2", "csv": "classification", "tsv": "classification", "jsonl": "classification",
            "json": "classification", "conll": "ner", "parquet": "classification"}  # fmt: skip


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("ext", sorted(_TASK_OF))
def test_a_binary_file_is_named_with_the_fix(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    path.write_bytes(bytes(range(256)) * 40)
    extra = ["data.source=null"] if ext == "txt" else []
    message = _fails(_TASK_OF[ext], tmp_path, *extra, *_only_train(path))
    if ext == "parquet":
        assert (
            message
            == f"{path} (data.train) is not a Parquet file (no PAR1 header); re-export it as Parquet or use .jsonl"
        )
    else:
        assert message.startswith(f"{path} (data.train) looks binary (it has NUL bytes), not ")
        assert message.endswith("text; point data.train at a UTF-8 file")


_LATIN1 = {
    "csv": "text,label\ncafé au lait,positive\nnaïve,negative\n",
    "jsonl": '{"text": "café", "label": "positive"}\n',
    "txt": "café naïve\n" * 20,
    "conll": "café B-PER\nx O\n",
}


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("ext", sorted(_LATIN1))
def test_a_latin1_file_says_re_save_as_utf8(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    text = _LATIN1[ext]
    path.write_bytes(text.encode("latin-1"))
    extra = ["data.source=null"] if ext == "txt" else []
    message = _fails(_TASK_OF[ext], tmp_path, *extra, *_only_train(path))
    offset = text.encode("utf-8").index("é".encode())
    assert message == (
        f"{path} (data.train) is not UTF-8 text (byte 0xe9 at offset {offset}); "
        "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 OLD > NEW"
    )


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("ext", ["jsonl", "txt", "csv"])
def test_a_bad_byte_past_the_first_64kb_is_caught_by_the_loader(tmp_path, ext):
    """The loaders decode strictly: bytes that are not UTF-8 fail while loading, not later in tokenization."""
    path = tmp_path / f"data.{ext}"
    row = {"jsonl": '{"text": "a fine row of text", "label": "positive"}\n', "txt": "a fine line of text\n",
           "csv": "a fine row,positive\n"}[ext]  # fmt: skip
    head = "text,label\n" if ext == "csv" else ""
    path.write_bytes((head + row * 5000).encode() + _LATIN1[ext if ext != "jsonl" else "jsonl"].encode("latin-1"))
    extra = ["data.source=null"] if ext == "txt" else []
    message = _fails(_TASK_OF[ext], tmp_path, *extra, *_only_train(path))
    assert message.startswith(f"{path} (data.train) is not UTF-8 text (byte 0xe9")
    assert message.endswith("re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 OLD > NEW")


@pytest.mark.usefixtures("at_root")
def test_utf16_is_named(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\nhello,positive\n".encode("utf-16"))
    assert _fails("classification", tmp_path, *_only_train(path)) == (
        f"{path} (data.train) is UTF-16 or UTF-32 text; re-save it as UTF-8"
    )


@pytest.mark.usefixtures("at_root")
def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first column is still `text`."""
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\ngood film,positive\nbad film,negative\n".encode("utf-8-sig"))
    est = _dry("classification", tmp_path, f"data.train={path}", "data.test=null")
    assert est["train_samples"] == 2


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize(
    "csv, message",
    [
        (
            "text,label\ngood,positive\nbad,negative,extra,more\n",
            "line 3: 4 fields where the header has 2; fix the row",
        ),
        ("text,label\ngood,positive\nbad\nok,negative\n", "line 3: 1 field where the header has 2; fix the row"),
        (
            'text,label\n"good,positive\nbad,negative\n',
            'line 3: 1 field where the header has 2; a quote (") is never closed',
        ),
    ],
)
def test_a_ragged_csv_names_the_line(tmp_path, csv, message):
    path = tmp_path / "ragged.csv"
    path.write_text(csv)
    assert _fails("classification", tmp_path, *_only_train(path)).startswith(f"{path} (data.train), {message}")


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"text": "a", "label": "x"}\n{oops\n',
            "line 2: invalid JSON (Expecting property name enclosed in double quotes)",
        ),
        ("[1, 2]\n[3]\n", "line 1: a JSON list, not an object; JSON Lines has one object per line"),
        ('{"text": "a", "label": "x"}\n7\n', "line 2: a JSON int, not an object"),
        # A bare null made pyarrow's JSON reader crash the whole process (SIGSEGV).
        ('null\n{"text": "a", "label": "x"}\n', "line 1: a bare null where a JSON object is expected; remove the line"),
        ('{"text": "a", "label": "x"}\n  null \n', "line 2: a bare null where a JSON object is expected"),
    ],
)
def test_malformed_json_lines_name_the_line(tmp_path, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    assert _fails("classification", tmp_path, *_only_train(path)).startswith(f"{path} (data.train), {message}")


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("name, text", [("head.csv", "text,label\n"), ("empty.json", "[]")])
def test_a_file_with_no_rows(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert _fails("classification", tmp_path, *_only_train(path)) == (
        f"{path} (data.train) has no rows; add rows (under the header, for CSV)"
    )


@pytest.mark.usefixtures("at_root")
def test_a_one_row_dataset(tmp_path):
    """One row cannot be split into train and validation: the recipe evaluates, so say how to fix it;
    without evaluation (or with a validation file) it runs."""
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "a good film", "label": "positive"}\n')
    assert _fails("classification", tmp_path, *_only_train(path)) == (
        f"trainer.eval_strategy=epoch needs a validation split, and the train split ({path}) has none: 1 row is too "
        "few to carve one (data.validation_split=0.05); give data.validation=FILE, add rows, or set trainer.eval_strategy=no"
    )
    assert _dry("classification", tmp_path, *_only_train(path), "trainer.eval_strategy=no")["train_samples"] == 1
    val = FIXTURES / "classification" / "validation.jsonl"
    labels = "options.labels=[negative,positive]"
    est = _dry("classification", tmp_path, f"data.train={path}", f"data.validation={val}", "data.test=null", labels)
    assert est["train_samples"] == 1 and est["eval_samples"] > 0


@pytest.mark.usefixtures("at_root")
def test_no_validation_split_while_evaluating_is_explained(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line " * 40 + "\n")
    message = _fails("gpt2", tmp_path, "data.source=null", f"data.train={path}", "data.validation_split=0")
    assert (
        "trainer.eval_strategy=steps needs a validation split" in message
        and "data.validation_split=0 carves none" in message
    )


def _words(n: int) -> str:
    return " ".join(f"w{i % 997} x{i % 13}" for i in range(n // 2))


@pytest.mark.usefixtures("at_root")
def test_a_10000_token_line_is_packed_for_pretraining(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(_words(10_000) + "\n")
    est = _dry("gpt2", tmp_path, "data.source=null", f"data.train={path}", "trainer.eval_strategy=no")
    assert est["train_samples"] >= 10_000 // 32  # at least one block per 32 of its tokens


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("name", ["classification", "ner", "summarization"])
def test_a_10000_token_row_is_truncated_for_fine_tuning(tmp_path, name):
    from llmkit.tasks import get_task

    words = _words(10_000).split()
    row = {
        "classification": {"text": " ".join(words), "label": "positive"},
        "ner": {"tokens": words, "ner_tags": ["O"] * len(words)},
        "summarization": {"document": " ".join(words), "summary": " ".join(words)},
    }[name]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(row) + "\n")
    recipe = _recipe(name, tmp_path, *_only_train(path), "trainer.eval_strategy=no")
    _, _, tokenized = engine.prepare_data(recipe, get_task(name), recipe.args)
    lengths = [len(ids) for ids in tokenized["train"]["input_ids"]]
    assert lengths == [recipe.data.max_length]


_MIXED = [
    (
        [1, "positive"],
        "row 2: label 'positive' is a string but train split ({train}), row 1 has an integer (1); use one type",
    ),
    ([1, 0.5], "row 1: label 1.0 is a number with a decimal point; labels must be strings or integer class ids"),
    ([True, False], "row 1: label True is true/false; labels must be strings or integer class ids"),
    ([1, None], "row 2: no label (an empty cell, a short CSV row or a null); label the row or remove it"),
    (
        [[1], [0]],
        "row 1: label [1] is a list; labels must be strings or integer class ids; several labels per row need",
    ),
    ([{"a": 1}, 0], "row 1: label {'a': 1} is a mapping"),
    ([100_000_000, 0], "row 1: label 100000000 would make 100,000,001 classes, but only 2 distinct labels appear"),
]


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("labels, message", _MIXED)
def test_labels_of_mixed_or_odd_types_name_the_row(tmp_path, labels, message):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"text {i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    got = _fails("classification", tmp_path, *_only_train(train), "trainer.eval_strategy=no", "data.validation_split=0")
    assert got.startswith(f"train split ({train}), {message.replace('{train}', str(train))}"), got


@pytest.mark.usefixtures("at_root")
def test_a_string_label_in_validation_where_train_has_integers(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    val.write_text('{"text": "c", "label": "1"}\n')
    assert _fails("classification", tmp_path, f"data.train={train}", f"data.validation={val}", "data.test=null") == (
        f"validation split ({val}), row 1: label '1' is a string but train split ({train}), row 1 has an integer (1); "
        "use one type for all labels: all strings or all integers"
    )


@pytest.mark.usefixtures("at_root")
def test_a_csv_column_of_mixed_labels_is_read_as_strings(tmp_path):
    """In CSV every cell is text: 1, pos and 0.5 are three string labels, which is a fine classification."""
    path = tmp_path / "mixed.csv"
    path.write_text("text,label\nfirst,1\nsecond,pos\nthird,0.5\n")
    recipe = _recipe("classification", tmp_path, f"data.train={path}", f"data.validation={path}", "data.test=null")
    est = engine.train(recipe, dry_run=True)
    assert est["train_samples"] == 3 and recipe.options.labels == ["0.5", "1", "pos"]


@pytest.mark.usefixtures("at_root")
def test_ner_tags_that_are_not_lists(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text('{"tokens": "EU rejects", "ner_tags": "B-ORG O"}\n')
    assert _fails("ner", tmp_path, *_only_train(path), "trainer.eval_strategy=no").startswith(
        f"train split ({path}), row 1: tags must be a list (one per word), got 'B-ORG O'; write JSON Lines like"
    )


@pytest.mark.usefixtures("at_root")
def test_a_text_that_is_not_a_string(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": 5, "label": "a"}\n{"text": "fine", "label": "b"}\n')
    message = _fails(
        "classification", tmp_path, *_only_train(path), "trainer.eval_strategy=no", "data.validation_split=0"
    )
    assert message.startswith(f"train split ({path}), row 1: text is 5, not a string; fix the data")
    # Kept under on_bad_rows=warn (the user's choice), such a row tokenizes as an empty text instead of crashing.
    kept = _dry(
        "classification",
        tmp_path,
        *_only_train(path),
        "trainer.eval_strategy=no",
        "data.validation_split=0",
        "data.on_bad_rows=warn",
    )
    assert kept["train_samples"] == 2


# --------------------------------------------------------------------------- nothing saved is destroyed


@pytest.mark.usefixtures("at_root")
def test_a_hostile_file_never_costs_the_previous_run(tmp_path):
    """`--overwrite` with a broken data file fails before the old run is touched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text("task: classification\n")  # an llmkit run, which --overwrite may replace
    (out / "summary.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,positive\nbad,negative,extra\n")
    with pytest.raises(DataError, match="line 3: 3 fields"):
        engine.train(_recipe("classification", tmp_path, *_only_train(bad)), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"weights" and (out / "summary.json").exists()


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("output_dir", [".", str(ROOT.parent), "tests"])
def test_an_output_dir_that_holds_the_work_is_refused(output_dir):
    """--overwrite deletes output_dir: it may not be the working folder, its parent or the data's folder."""
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "tiny" / "classification.yaml", [f"trainer.output_dir='{output_dir}'"])
    assert f"trainer.output_dir {output_dir} contains " in str(err.value)
    assert str(err.value).endswith(
        "which --overwrite would delete; choose a folder of its own, e.g. trainer.output_dir=runs/my-run"
    )


@pytest.mark.parametrize(
    ("section", "value"), [("generation", {"bad\nkey": 1}), ("model.config", {"model_type": "bert", "bad\nkey": 1})]
)
def test_an_unknown_key_with_a_line_break_is_shown_on_one_line(section, value):
    # found by the property test above: the key was printed raw, breaking the one-line message
    from llmkit.modeling import build_config
    from llmkit.tasks import get_task

    outcome = _outcome(yaml.safe_dump(_apply([("model.name_or_path", None), (section, value)])))
    if isinstance(outcome, Recipe):  # model.config keys are checked against the config class when it is built
        with pytest.raises(LlmkitError) as caught:
            build_config(outcome, get_task(outcome.task), None, {})
        outcome = caught.value
    assert "\n" not in str(outcome) and f"unknown key '{section}.bad\\nkey'" in str(outcome)


def test_a_column_role_with_a_line_break_is_shown_on_one_line():
    # found by the property test above in a CI-like run: the role was printed raw, breaking the one-line message
    outcome = _outcome(yaml.safe_dump(_apply([("data.columns", {"bad\nrole": None})])))
    assert isinstance(outcome, LlmkitError) and "\n" not in str(outcome)
    assert str(outcome).startswith("'data.columns.bad\\nrole' must be a column name (a string), got None")


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("missing", ["{}", '{"ner_tags": null}'])
def test_ner_rows_without_tags_are_bad_rows_under_every_policy(tmp_path, caplog, missing):
    path = tmp_path / "ner.jsonl"
    second = json.loads(missing) | {"tokens": ["Bob", "went"]}
    path.write_text(
        json.dumps({"tokens": ["Ann", "sang"], "ner_tags": ["B-PER", "O"]}) + "\n" + json.dumps(second) + "\n"
        + json.dumps({"tokens": ["Eve", "ran"], "ner_tags": ["B-PER", "O"]}) + "\n"
    )  # fmt: skip
    only = [*_only_train(path), "trainer.eval_strategy=no", "data.validation_split=0"]
    assert _fails("ner", tmp_path, *only).startswith(
        f"train split ({path}), row 2: no ner_tags (one tag per word); fix the data, or set data.on_bad_rows=skip"
    )
    for policy in ("skip", "warn"):  # warn cannot keep a row without tags: it is dropped, with a warning
        caplog.clear()
        assert _dry("ner", tmp_path, *only, f"data.on_bad_rows={policy}")["train_samples"] == 2
        assert any("1 bad rows dropped (first: row 2: no ner_tags" in m for m in caplog.messages)


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize("extra", [[], ["data.validation_split=0.3"], ["data.max_train_samples=45"]])
def test_a_bad_row_is_named_by_its_row_in_the_source_file(tmp_path, extra):
    """Carving a validation split (seeded shuffle) or capping must not change the row a message names."""
    rows = [{"text": f"review number {i}", "label": "a" if i % 2 else "b"} for i in range(1, 51)]
    rows[37]["text"] = "   "  # the 38th data row (line 38 of the file)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _fails("classification", tmp_path, *_only_train(path), "trainer.eval_strategy=no", *extra)
    assert ", row 38: empty text;" in message and str(path) in message


@pytest.mark.usefixtures("at_root")
@pytest.mark.parametrize(
    ("suffix", "sep"), [(".csv", ";"), (".csv", "|"), (".tsv", "\t"), (".csv", "\t"), (".tsv", ",")]
)
def test_the_field_separator_is_found_and_named(tmp_path, suffix, sep):
    from llmkit import preflight
    from llmkit.tasks import get_task

    path = tmp_path / f"labels{suffix}"
    rows = [("a fine film, truly", "positive"), ("dull; long", "negative")] * 6
    quote = (lambda t: f'"{t}"') if sep in ",;" else (lambda t: t)
    path.write_text(f"text{sep}label\n" + "".join(f"{quote(t)}{sep}{label}\n" for t, label in rows))
    recipe = _recipe(
        "classification", tmp_path, *_only_train(path), "trainer.eval_strategy=no", "data.validation_split=0"
    )
    assert engine.train(recipe, dry_run=True)["train_samples"] == 12 and recipe.options.labels == [
        "negative",
        "positive",
    ]
    raw, tokenizer = preflight.load_data(recipe, get_task("classification"))
    report = preflight.build_report(recipe, get_task("classification"), raw, tokenizer)
    assert report["splits"]["train"]["delimiter"] == sep
    assert f"train: fields separated by {sep!r}" in preflight.format_report(report)
