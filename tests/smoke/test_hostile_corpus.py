"""A corpus of malformed data files for every fine-tuning task: each ends in a run that validates and tokenizes
(where the data is usable under the policy) or in exit 2 with one line naming the file; never exit 1, never a
traceback. The runs are dry runs: everything a run reads is read, loaded, checked and tokenized."""

import codecs
import json

import pytest
from conftest import RECIPES, ROOT
from typer.testing import CliRunner

from llmkit.cli import app

pytestmark = pytest.mark.smoke
runner = CliRunner()

GOOD = {
    "classification": [
        {"text": f"a {w} film with actors", "label": lab} for w, lab in [("fine", "pos"), ("dull", "neg")] * 6
    ],
    "ner": [{"tokens": ["Ann", "went", "to", "Paris"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]}] * 12,
    "summarization": [
        {"document": f"The {w} bridge opened on Monday. People came.", "summary": f"The {w} bridge opened."}
        for w in ("new", "old")
    ]
    * 6,
}
TEXT = {"classification": "text", "ner": "tokens", "summarization": "document"}
TARGET = {"classification": "label", "ner": "ner_tags", "summarization": "summary"}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(task, rows, sep=",") -> bytes:
    keys = list(rows[0])
    quote = lambda v: '"' + str(v).replace('"', '""') + '"'  # noqa: E731
    return (sep.join(keys) + "\n" + "".join(sep.join(quote(r[k]) for k in keys) + "\n" for r in rows)).encode()


def _conll(rows) -> bytes:
    return (
        "\n\n".join(
            "\n".join(f"{t} {g}" for t, g in zip(r["tokens"], r["ner_tags"], strict=True)) for r in rows
        ).encode()
        + b"\n"
    )


def _with(task, index, **changes):
    rows = [dict(r) for r in GOOD[task]]
    rows[index].update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del rows[index][key]
    return rows


_DROP = object()


def _cases(task):
    good, text, target = GOOD[task], TEXT[task], TARGET[task]
    value = (lambda s: s.split()) if task == "ner" else (lambda s: s)
    cases = {
        "truncated last line": (".jsonl", _jsonl(good)[:-15]),
        "utf-8 bom": (".jsonl", codecs.BOM_UTF8 + _jsonl(good)),
        "latin-1": (".jsonl", _jsonl(_with(task, 2, **{text: value("café crème brûlée")})).decode().encode("latin-1")),
        "utf-16": (".jsonl", _jsonl(good).decode().encode("utf-16")),
        "binary": (".jsonl", bytes(range(256)) * 40),
        "empty file": (".jsonl", b""),
        "only blank lines": (".jsonl", b"\n\n   \n"),
        "json array": (".json", json.dumps(good).encode()),
        "a bare null line": (".jsonl", _jsonl(good[:3]) + b"null\n" + _jsonl(good[3:])),
        "a string line": (".jsonl", _jsonl(good[:3]) + b'"just a string"\n' + _jsonl(good[3:])),
        "invalid json mid-file": (".jsonl", _jsonl(good[:5]) + b'{"text": "broken\n' + _jsonl(good[5:])),
        f"null {text}": (".jsonl", _jsonl(_with(task, 3, **{text: None}))),
        f"null {target}": (".jsonl", _jsonl(_with(task, 3, **{target: None}))),
        f"missing {target} key": (".jsonl", _jsonl(_with(task, 3, **{target: _DROP}))),
        f"missing {text} column": (".jsonl", _jsonl([{k: v for k, v in r.items() if k != text} for r in good])),
        f"empty {text}": (".jsonl", _jsonl(_with(task, 4, **{text: [] if task == "ner" else ""}))),
        f"whitespace {text}": (".jsonl", _jsonl(_with(task, 4, **{text: ["  "] if task == "ner" else "   \t"}))),
        f"number as {text}": (".jsonl", _jsonl(_with(task, 1, **{text: 12345}))),
        f"object as {text}": (".jsonl", _jsonl(_with(task, 1, **{text: {"nested": "value"}}))),
        f"list as {target}": (
            ".jsonl",
            _jsonl(_with(task, 1, **{target: ["a", "b"] if task != "ner" else [["B-PER"]]})),
        ),
        f"mixed {target} types": (".jsonl", _jsonl(_with(task, 5, **{target: 7 if task != "ner" else [1, 2, 3, 4]}))),
        "extra columns": (".jsonl", _jsonl([{**r, "id": i, "note": "x"} for i, r in enumerate(good)])),
        "10 MB single line": (".jsonl", _jsonl(_with(task, 0, **{text: value("word " * 2_000_000)}))),
        "emoji and accents": (".jsonl", _jsonl(_with(task, 0, **{text: value("naïve café 🎬 über")}))),
        "crlf endings": (".jsonl", _jsonl(good).replace(b"\n", b"\r\n")),
        "duplicate rows": (".jsonl", _jsonl(good + good)),
        "one row": (".jsonl", _jsonl(good[:1])),
    }
    if task != "ner":
        cases |= {
            "csv": (".csv", _csv(task, good)),
            "csv with semicolons": (".csv", _csv(task, good, ";")),
            "header-only csv": (".csv", _csv(task, good).split(b"\n")[0] + b"\n"),
            "ragged csv": (".csv", _csv(task, good) + b'"one","two","three"\n'),
            "unclosed csv quote": (".csv", _csv(task, good[:4]) + b'"never closed,x\n' + _csv(task, good[4:])),
        }
    else:
        conll = _conll(good)
        cases |= {
            "conll": (".conll", conll),
            "conll tabs and spaces": (".conll", conll.replace(b" B-", b"\tB-")),
            "conll three columns": (".conll", conll.replace(b" O", b" NN O").replace(b" B-", b" NNP B-")),
            "conll docstart only": (".conll", b"-DOCSTART- -X- -X- O\n\n"),
            "conll a line without a tag": (".conll", conll.replace(b"went O", b"went", 1)),
            "tags and tokens of different lengths": (".jsonl", _jsonl(_with(task, 2, ner_tags=["O"]))),
            "tags that are a string": (".jsonl", _jsonl(_with(task, 2, ner_tags="B-PER O O B-LOC"))),
            "an I- tag without B-": (".jsonl", _jsonl(_with(task, 2, ner_tags=["I-PER", "O", "O", "B-LOC"]))),
        }
    return cases


CASES = [(task, name) for task in GOOD for name in _cases(task)]
ROW_LEVEL = ("null", "missing", "empty", "whitespace", "number", "object", "list", "mixed", "lengths", "string", "tag")
# Every case under data.on_bad_rows=error; the row-level ones under skip too (file-level ones behave alike).
RUNS = [(t, n, "error") for t, n in CASES] + [(t, n, "skip") for t, n in CASES if any(w in n for w in ROW_LEVEL)]


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validation")
    for task, rows in GOOD.items():
        (folder / f"{task}.jsonl").write_bytes(_jsonl(rows[:4]))
    (folder / "unseen.jsonl").write_bytes(_jsonl([{"text": "a film", "label": "never-seen"}]))
    return folder


@pytest.mark.parametrize(("task", "name", "policy"), RUNS, ids=[f"{t}: {n} ({p})" for t, n, p in RUNS])
def test_a_malformed_file_is_a_run_or_one_line(tmp_path, monkeypatch, validation, task, name, policy):
    monkeypatch.chdir(ROOT)
    suffix, content = _cases(task)[name]
    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    argv = ["finetune", str(RECIPES / "tiny" / f"{task}.yaml"), "--dry-run", f"data.train={path}"]
    argv += [f"data.validation={validation / f'{task}.jsonl'}", "data.test=null", f"trainer.output_dir={tmp_path}/run"]
    argv += [f"data.on_bad_rows={policy}"]
    result = runner.invoke(app, argv)
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.output[-2000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
        named = (str(path), str(validation), "data.train", "data.validation")  # the file (or its key) at fault
        assert any(n in errors[0] for n in named), errors[0]
    else:
        assert "Estimate:" in result.stdout


def test_labels_never_seen_in_training_are_one_line(tmp_path, monkeypatch, validation):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "train.jsonl"
    path.write_bytes(_jsonl(GOOD["classification"]))
    argv = ["finetune", str(RECIPES / "tiny/classification.yaml"), "--dry-run", f"data.train={path}"]
    argv += [f"data.validation={validation / 'unseen.jsonl'}", "data.test=null", f"trainer.output_dir={tmp_path}/run"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(
        f"error: validation split ({validation / 'unseen.jsonl'}), row 1: label 'never-seen'"
    )
