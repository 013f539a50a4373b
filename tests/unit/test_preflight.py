"""The data preflight: per-split counts, train/eval duplicates, labels, NER tag checks, truncation, on_bad_rows."""

import json
import logging

import pytest
from conftest import RECIPES, ROOT
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from typer.testing import CliRunner

from llmkit import preflight
from llmkit.cli import app
from llmkit.config import load_recipe
from llmkit.errors import DataError
from llmkit.tasks import get_task

NAMED = ["data.train=train.jsonl", "data.validation=validation.jsonl"]  # how the messages name the splits


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word and no special tokens: lengths are word counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _recipe(name, *overrides):
    return load_recipe(RECIPES / f"tiny/{name}.yaml", [*NAMED, *overrides])


def _splits(**splits):
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


def _report(recipe, raw, tokenizer):
    """The report as a run makes it: the task's labels() first (it sets options.labels)."""
    task = get_task(recipe.task)
    if task.labels is not None:
        recipe.options.labels = task.labels(recipe, raw)
    return preflight.build_report(recipe, task, raw, tokenizer)


def test_counts_empty_rows_duplicates_and_unseen_labels(tokenizer, caplog):
    recipe = _recipe("classification", "data.on_bad_rows=warn", "options.labels=[negative,neutral,positive]")
    raw = _splits(
        train=[
            {"text": "a fine film", "label": "positive"},
            {"text": "   ", "label": "negative"},
            {"text": "dull", "label": "negative"},
            {"text": "great cast", "label": "positive"},
        ],
        validation=[
            {"text": "great cast", "label": "positive"},  # also in train
            {"text": "so so", "label": "neutral"},  # a label train never shows
            {"text": "dull", "label": "negative"},  # also in train
        ],
    )
    report = _report(recipe, raw, tokenizer)
    train, val = report["splits"]["train"], report["splits"]["validation"]
    assert (train["rows"], train["empty_rows"], train["bad_rows"]) == (4, 1, 1)
    assert train["first_bad_row"] == {"row": 2, "problem": "empty text"}
    assert train["label_counts"] == {"positive": 2, "negative": 2}
    assert (val["rows"], val["empty_rows"], val["bad_rows"]) == (3, 0, 0)
    assert val["duplicates_of_train"] == 2
    assert val["unseen_labels"] == ["neutral"]
    assert "duplicates_of_train" not in train
    assert json.loads(json.dumps(report)) == report  # JSON as it is

    with caplog.at_level(logging.WARNING, logger="llmkit"):
        preflight.enforce(recipe, get_task("classification"), raw, report)  # warn: the empty row passes
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "validation split (validation.jsonl): 2 rows are also in the training data" in logged
    assert "labels never seen in training: neutral (1)" in logged


def test_an_empty_string_is_not_a_duplicate(tokenizer):
    recipe = _recipe("classification", "data.on_bad_rows=warn")
    raw = _splits(
        train=[{"text": "", "label": "a"}, {"text": "x", "label": "b"}],
        validation=[{"text": "", "label": "a"}, {"text": "y", "label": "b"}],
    )
    assert _report(recipe, raw, tokenizer)["splits"]["validation"]["duplicates_of_train"] == 0


NER_ROWS = [
    {"tokens": ["John", "Smith"], "ner_tags": ["B-PER", "I-PER"]},
    {"tokens": ["in", "New", "York"], "ner_tags": ["O", "I-LOC", "I-LOC"]},  # I- after O
    {"tokens": ["Paris"], "ner_tags": ["I-LOC"]},  # I- first in the sentence
    {"tokens": ["Ann", "Paris"], "ner_tags": ["B-PER", "I-LOC"]},  # I- of another type
    {"tokens": ["the", "Bank"], "ner_tags": ["O", "B-ORG"]},
]


@pytest.mark.parametrize("classlabel", [False, True], ids=["string tags", "ClassLabel ids"])
def test_ner_tag_scheme_violations(tokenizer, caplog, classlabel):
    recipe = _recipe("ner")
    rows = [dict(r) for r in NER_ROWS]
    if classlabel:
        names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
        features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
        rows = [{"tokens": r["tokens"], "ner_tags": [names.index(t) for t in r["ner_tags"]]} for r in rows]
        raw = DatasetDict(train=Dataset.from_list(rows, features=features))
    else:
        raw = _splits(train=rows)
    facts = _report(recipe, raw, tokenizer)["splits"]["train"]
    assert facts["tag_scheme_violations"] == 3
    assert facts["first_tag_scheme_violation"] == {"row": 2, "token": 1, "tag": "I-LOC", "after": "O"}
    assert facts["length_mismatches"] == 0 and facts["bad_rows"] == 0
    assert facts["label_counts"]["I-LOC"] == 4 and facts["label_counts"]["O"] == 2
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        report = preflight.preflight(recipe, get_task("ner"), raw, tokenizer)  # a warning, not an error
    assert report["splits"]["train"]["tag_scheme_violations"] == 3
    assert any("3 rows have an I- tag without a B- of its type before it" in r.getMessage() for r in caplog.records)


def test_length_mismatch_is_a_one_line_data_error_under_on_bad_rows_error(tokenizer):
    recipe = _recipe("ner", "data.on_bad_rows=error")
    raw = _splits(
        train=[
            *NER_ROWS[:1],
            {"tokens": ["a", "b"], "ner_tags": ["O"]},
            {"tokens": ["c"], "ner_tags": ["O", "O", "O"]},
        ]
    )
    report = _report(recipe, raw, tokenizer)
    assert report["splits"]["train"]["length_mismatches"] == 2
    assert report["splits"]["train"]["first_bad_row"] == {"row": 2, "problem": "2 tokens but 1 tags"}
    with pytest.raises(DataError) as e:
        preflight.preflight(recipe, get_task("ner"), raw, tokenizer)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("train split (train.jsonl), row 2: 2 tokens but 1 tags (2 bad rows in all)")
    assert "data.on_bad_rows=skip" in message
    # Under skip the same rows are reported, not raised on: the task's preprocess drops them.
    skip = _recipe("ner", "data.on_bad_rows=skip")
    assert preflight.preflight(skip, get_task("ner"), raw, tokenizer)["splits"]["train"]["bad_rows"] == 2


@pytest.mark.parametrize(
    "name, rows",
    [
        ("classification", [{"text": "ok", "label": "a"}, {"text": " \t", "label": "b"}]),
        ("ner", [{"tokens": ["x"], "ner_tags": ["O"]}, {"tokens": [], "ner_tags": []}]),
        ("ner", [{"tokens": ["x"], "ner_tags": ["O"]}, {"tokens": ["x", "y"], "ner_tags": ["O"]}]),
        ("summarization", [{"document": "d e", "summary": "s"}, {"document": "", "summary": "s"}]),
        ("summarization", [{"document": "d e", "summary": "s"}, {"document": "d", "summary": "  "}]),
    ],
)
def test_the_bad_row_error_is_the_tasks_own(tokenizer, name, rows):
    """The scan finds each kind of row the task rejects; under `error` the failure is the task's own, word for word."""
    recipe = _recipe(name, "data.on_bad_rows=error")
    raw = _splits(train=rows)
    task = get_task(name)
    report = _report(recipe, raw, tokenizer)
    with pytest.raises(DataError) as ours:
        preflight.enforce(recipe, task, raw, report)
    with pytest.raises(DataError) as theirs:
        task.preprocess(recipe, raw, tokenizer)
    assert str(ours.value) == str(theirs.value)
    assert f"train split (train.jsonl), row {report['splits']['train']['first_bad_row']['row']}: " in str(ours.value)


def test_truncation_counts(tokenizer, monkeypatch):
    recipe = _recipe("classification", "data.max_length=8")
    words = [3, 8, 9, 20]  # tokens per text with this tokenizer: over 8 are the last two
    raw = _splits(train=[{"text": " ".join(["w"] * n), "label": "a"} for n in words])
    report = _report(recipe, raw, tokenizer)
    facts = report["splits"]["train"]
    assert (facts["truncated"], facts["truncated_share"], facts["longest"], facts["tokenized_rows"]) == (2, 0.5, 20, 4)
    assert "50.0% of examples (2 of 4 rows) are longer than data.max_length=8" in report["warnings"][0]

    recipe = _recipe("summarization", "data.max_length=8", "data.max_target_length=3")
    rows = [{"document": " ".join(["w"] * n), "summary": " ".join(["s"] * m)} for n, m in [(9, 1), (2, 4), (8, 3)]]
    facts = _report(recipe, _splits(train=rows), tokenizer)["splits"]["train"]
    assert (facts["truncated"], facts["truncated_targets"], facts["longest_target"]) == (1, 1, 4)

    monkeypatch.setattr(preflight, "MAX_TOKENIZED", 2)  # a large split: an even sample is tokenized
    recipe = _recipe("classification", "data.max_length=8")
    facts = _report(recipe, raw, tokenizer)["splits"]["train"]
    assert facts["rows"] == 4 and facts["tokenized_rows"] == 2  # rows 0 and 2: 3 and 9 words
    assert (facts["truncated"], facts["longest"]) == (1, 9)
    assert "even sample of 2 rows" in preflight.format_report({**_report(recipe, raw, tokenizer)})


def test_pretraining_reports_documents_and_tokens_not_truncation(tokenizer):
    recipe = load_recipe(RECIPES / "tiny/bert.yaml", ["data.max_length=8"])
    raw = _splits(
        train=[{"text": "one two three"}, {"text": " "}, {"text": "four five six seven eight nine ten eleven twelve"}]
    )
    facts = _report(recipe, raw, tokenizer)["splits"]["train"]
    assert (facts["documents"], facts["empty_rows"], facts["tokens"], facts["approx_blocks"]) == (2, 1, 12, 1)
    assert facts["tokens_per_document"] == 6.0
    assert "truncated" not in facts and "bad_rows" not in facts


def test_format_report_is_a_table(tokenizer):
    recipe = _recipe("classification", "data.on_bad_rows=warn")
    raw = _splits(
        train=[{"text": "a b", "label": "x"}, {"text": "", "label": "y"}],
        validation=[{"text": "a b", "label": "x"}],
    )
    text = preflight.format_report(_report(recipe, raw, tokenizer))
    lines = text.splitlines()
    assert lines[0].startswith("Data preflight (classification): on_bad_rows=warn")
    assert lines[1].split() == ["train", "validation"]
    rows = {line[:32].strip(): line[32:].split() for line in lines[2:] if line[:32].strip()}
    assert rows["rows"] == ["2", "1"] and rows["empty rows"] == ["1", "0"] and rows["duplicates of train"] == ["-", "1"]
    assert "first bad row in train: row 2: empty text" in text


runner = CliRunner()


def test_cli_check_prints_and_saves_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the tiny recipes name their data relative to the repository root
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["check", str(RECIPES / "tiny/ner.yaml"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "Data preflight (ner)" in result.output and f"Saved the report to {out}" in result.output
    report = json.loads(out.read_text())
    assert {s: f["rows"] for s, f in report["splits"].items()} == {"train": 64, "validation": 24, "test": 24}
    assert report["splits"]["train"]["tag_scheme_violations"] == 0
    assert report["splits"]["validation"]["duplicates_of_train"] == 3  # the fixture repeats 3 training sentences

    run_dir = tmp_path / "run"  # no --json: saved in the run folder only when it exists
    result = runner.invoke(app, ["check", str(RECIPES / "tiny/ner.yaml"), f"trainer.output_dir={run_dir}"])
    assert result.exit_code == 0 and "Saved" not in result.output and not run_dir.exists()
    run_dir.mkdir()
    result = runner.invoke(app, ["check", str(RECIPES / "tiny/ner.yaml"), f"trainer.output_dir={run_dir}"])
    assert result.exit_code == 0 and json.loads((run_dir / "preflight.json").read_text())["task"] == "ner"


def test_cli_check_exits_2_on_a_bad_row_after_saving_the_report(tmp_path, monkeypatch, write):
    monkeypatch.chdir(ROOT)
    rows = [
        {"text": "good", "label": "positive"},
        {"text": "", "label": "negative"},
        {"text": "bad", "label": "negative"},
    ]
    train = write("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    argv = ["check", str(RECIPES / "tiny/classification.yaml"), f"data.train={train}", "--json", str(out)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: train split ({train}), row 2: empty text; fix the data, or set data.on_bad_rows=skip to drop such rows"
    )
    assert json.loads(out.read_text())["splits"]["train"]["bad_rows"] == 1
    result = runner.invoke(app, [*argv, "data.on_bad_rows=skip"])
    assert result.exit_code == 0, result.output
