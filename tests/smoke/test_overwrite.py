"""`--overwrite` replaces only what llmkit wrote: a run or export folder it recognises, an empty folder,
or a predictions file. Anything else is one line on stderr, exit 2, and nothing is touched."""

import json

import pytest
from conftest import RECIPES, ROOT, at_repo_root
from typer.testing import CliRunner

from llmkit.cli import app

pytestmark = pytest.mark.smoke

runner = CliRunner()
THESIS = "four years of my life"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tiny recipes name their fixtures relative to the repository root


def _invoke(*argv):
    return runner.invoke(app, [str(a) for a in argv])


def _refused(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _foreign_folder(tmp_path, name="mine"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thesis.txt").write_text(THESIS)
    return folder


def _untouched(folder):
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert (folder / "thesis.txt").read_text() == THESIS


@pytest.mark.parametrize(("command", "recipe"), [("pretrain", "bert"), ("finetune", "classification")])
def test_training_overwrite_refuses_a_folder_llmkit_did_not_write(tmp_path, command, recipe):
    folder = _foreign_folder(tmp_path)
    result = _invoke(command, RECIPES / "tiny" / f"{recipe}.yaml", f"trainer.output_dir={folder}", "--overwrite")
    _refused(result, str(folder), "not an llmkit run", "--overwrite")
    _untouched(folder)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny classification run, finished, for the export and predict cases."""
    out = tmp_path_factory.mktemp("run") / "cls"
    with at_repo_root():
        result = runner.invoke(
            app, ["finetune", str(RECIPES / "tiny/classification.yaml"), f"trainer.output_dir={out}"]
        )
    assert result.exit_code == 0, result.output
    return out


def test_training_overwrite_refuses_a_run_folder_holding_a_foreign_file(finished_run, tmp_path):
    import shutil

    run_copy = tmp_path / "copy"
    shutil.copytree(finished_run, run_copy)
    (run_copy / "thesis.txt").write_text(THESIS)
    before = sorted(p.name for p in run_copy.iterdir())
    result = _invoke("finetune", RECIPES / "tiny/classification.yaml", f"trainer.output_dir={run_copy}", "--overwrite")
    _refused(result, "thesis.txt", "llmkit did not write")
    assert sorted(p.name for p in run_copy.iterdir()) == before
    assert (run_copy / "thesis.txt").read_text() == THESIS


def test_a_finished_run_writes_only_names_llmkit_recognises(finished_run):
    from llmkit.rundir import foreign_entries

    assert foreign_entries(finished_run) == []


def test_export_overwrite_refuses_a_folder_llmkit_did_not_write(finished_run, tmp_path):
    folder = _foreign_folder(tmp_path)
    _refused(_invoke("export", finished_run, folder, "--overwrite"), str(folder), "not an llmkit")
    _untouched(folder)


def test_export_overwrite_replaces_a_previous_export(finished_run, tmp_path):
    dest = tmp_path / "exported"
    assert _invoke("export", finished_run, dest).exit_code == 0
    (dest / "stale.safetensors").write_bytes(b"old")  # an llmkit-looking leftover of an older export
    result = _invoke("export", finished_run, dest, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (dest / "stale.safetensors").exists() and (dest / "model.safetensors").exists()
    assert (dest / "recipe.yaml").exists()


def test_predict_overwrite_refuses_a_file_llmkit_did_not_write(finished_run, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a wonderful film"}\n')
    thesis = tmp_path / "thesis.txt"
    thesis.write_text(THESIS)
    _refused(_invoke("predict", finished_run, "-i", inputs, "-o", thesis, "--overwrite"), str(thesis))
    assert thesis.read_text() == THESIS
    # A JSON-lines file without llmkit's prediction fields (another program's output, the user's data).
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "mine", "note": "keep"}\n')
    _refused(_invoke("predict", finished_run, "-i", inputs, "-o", data, "--overwrite"), str(data))
    assert data.read_text() == '{"text": "mine", "note": "keep"}\n'
    # The input file itself: predictions never replace their own inputs.
    _refused(_invoke("predict", finished_run, "-i", inputs, "-o", inputs, "--overwrite"), "input")
    assert inputs.read_text() == '{"text": "a wonderful film"}\n'
    # A folder is not a predictions file.
    folder = _foreign_folder(tmp_path, "preds-folder")
    _refused(_invoke("predict", finished_run, "-i", inputs, "-o", folder, "--overwrite"), str(folder))
    _untouched(folder)


def test_predict_overwrite_replaces_previous_predictions(finished_run, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a wonderful film"}\n{"text": "a dull script"}\n')
    preds = tmp_path / "preds.jsonl"
    assert _invoke("predict", finished_run, "-i", inputs, "-o", preds).exit_code == 0
    inputs.write_text('{"text": "only one now"}\n')
    result = _invoke("predict", finished_run, "-i", inputs, "-o", preds, "--overwrite")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["only one now"] and "label" in rows[0]
