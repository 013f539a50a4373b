"""The command line: arguments reach the engine, errors are one line with exit 2."""

import subprocess
import sys

import pytest
from conftest import RECIPES, ROOT
from typer.testing import CliRunner

from llmkit import __version__
from llmkit import engine as llmkit_engine
from llmkit.cli import app

runner = CliRunner()


@pytest.fixture
def engine(monkeypatch):
    """Replace engine.train with a stub that records what it was called with."""
    calls = []

    def fake_train(recipe, **kwargs):
        calls.append((recipe, kwargs))
        if kwargs.get("dry_run"):
            return {"parameters": 10, "steps": 3}
        return {
            "task": recipe.task,
            "model": "m",
            "parameters": 100,
            "trainable_parameters": 100,
            "steps": 3,
            "epochs": 1.0,
            "global_batch_size": 8,
            "wall_time_s": 1.0,
            "train_samples_per_second": 9.0,
            "train_tokens_per_second": 288.0,
            "final_metrics": {"eval_loss": 1.5},
            "output_dir": recipe.trainer["output_dir"],
        }

    monkeypatch.setattr(llmkit_engine, "train", fake_train)
    return calls


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"llmkit {__version__}"


def test_help_imports_no_ml_library():
    code = "import sys; from llmkit.cli import app; assert not {'torch','transformers','datasets'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"]])
def test_help_imports_neither_rich_nor_the_recipe_loader(argv):
    # Rich (with markdown-it) was most of `llmkit --help`'s start-up time; the help is Click's plain one.
    code = (
        "import sys\nfrom llmkit.cli import app\ntry:\n    app(sys.argv[1:], prog_name='llmkit')\nexcept SystemExit:\n    pass\n"
        "loaded = {'rich', 'yaml', 'torch', 'transformers', 'datasets'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, cwd=ROOT, capture_output=True, text=True)
    assert "Usage: llmkit" in out.stdout


def test_help_lists_every_command_untruncated():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1].splitlines()[1:]
    names = [line.split()[0] for line in commands if line.strip()]
    assert " ".join(names) == "pretrain finetune check prepare evaluate predict tune export report init recipes recipe"
    assert not [line for line in commands if line.endswith("...")], result.output


def test_gc_comes_back_frozen_after_startup():
    # main() turns the collector off for the imports; once the libraries are in it is back on, with what
    # the imports built frozen. Under a caller that never turned it off (CliRunner, Python users) nothing changes.
    code = (
        "import gc\nfrom llmkit import console as cli\n"
        "cli.end_of_startup()\nassert gc.isenabled() and gc.get_freeze_count() == 0\n"
        "gc.disable()\ncli.end_of_startup()\nassert gc.isenabled() and gc.get_freeze_count() > 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pretrain_passes_recipe_overrides_and_flags(engine):
    result = runner.invoke(
        app, ["pretrain", str(RECIPES / "tiny/bert.yaml"), "trainer.seed=7", "data.max_length=16", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    ((recipe, kwargs),) = engine
    assert recipe.task == "mlm"
    assert recipe.trainer["seed"] == 7 and recipe.args.seed == 7
    assert recipe.data.max_length == 16
    assert kwargs == {"overwrite": True, "resume": False}
    assert "eval_loss" in result.output and "288 tokens/s" in result.output
    assert "Next: llmkit evaluate runs/tiny-bert --split test" in result.output


def test_dry_run_prints_resolved_recipe_and_estimate(engine):
    result = runner.invoke(app, ["pretrain", str(RECIPES / "tiny/gpt2.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert engine[0][1] == {"dry_run": True}
    assert "task: clm" in result.output and "Estimate:" in result.output and "parameters" in result.output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "missing.yaml"], "recipe file not found: missing.yaml"),
        (["pretrain", str(RECIPES / "bert.yaml"), "--lr", "3"], "bad override '--lr'"),
        (["pretrain", str(RECIPES / "bert.yaml"), "data.max_lenght=3"], "did you mean 'max_length'"),
        (["pretrain", str(RECIPES / "bert.yaml"), "trainer.learnig_rate=3"], "did you mean 'learning_rate'"),
        (["finetune", str(RECIPES / "bert.yaml")], "run it with `llmkit pretrain`"),
        (["recipe", "show", "missing.yaml"], "recipe file not found"),
        (["export", "runs/x", "out", "--format", "tflite"], "unknown export format 'tflite'"),
        (
            ["tune", str(RECIPES / "tiny/classification-tune.yaml"), "search={a.b: {float: [1, 0]}}"],
            "low must be below",
        ),
        (["tune", str(RECIPES / "tiny/classification-tune.yaml"), "tune.sampler=cmaes"], "tune.sampler must be tpe or"),
        (["export", "runs/x", "out", "--format", "onnx", "--quantize", "int4"], "unknown precision 'int4'"),
    ],
)
def test_errors_are_one_line_exit_2(engine, argv, message):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert engine == []


def test_unexpected_errors_exit_1_and_debug_shows_traceback(monkeypatch):
    def boom(recipe, **kwargs):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(llmkit_engine, "train", boom)
    argv = ["pretrain", str(RECIPES / "tiny/bert.yaml")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1
    assert "RuntimeError: kaboom (run again with --debug" in result.stderr
    result = runner.invoke(app, [*argv, "--debug"])
    assert isinstance(result.exception, RuntimeError)


def test_interrupt_exits_130(monkeypatch):
    def interrupted(recipe, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmkit_engine, "train", interrupted)
    result = runner.invoke(app, ["pretrain", str(RECIPES / "tiny/bert.yaml"), "trainer.output_dir=runs/never-made"])
    assert result.exit_code == 130 and result.stderr.strip().splitlines() == ["interrupted"]
    assert result.stdout == "" and not (ROOT / "runs/never-made").exists()  # no report, nothing written
    # Interrupted with a checkpoint saved: the exact command to resume (without --overwrite).
    from llmkit.errors import Interrupted

    def stopped(recipe, **kwargs):
        raise Interrupted("stopped at step 3; checkpoint saved in runs/x/checkpoint-3")

    monkeypatch.setattr(llmkit_engine, "train", stopped)
    argv = ["pretrain", str(RECIPES / "tiny/bert.yaml"), "--overwrite"]
    monkeypatch.setattr(sys, "argv", ["llmkit", *argv])  # what the console script sees
    result = runner.invoke(app, argv)
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        "interrupted: stopped at step 3; checkpoint saved in runs/x/checkpoint-3. "
        f"Resume with: llmkit pretrain {RECIPES / 'tiny/bert.yaml'} --resume"
    )


def test_recipe_show_merges_and_overrides():
    result = runner.invoke(app, ["recipe", "show", str(RECIPES / "tiny/bert.yaml"), "trainer.seed=3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "extends" not in out
    assert "hidden_size: 32" in out and "mlm_probability: 0.15" in out and "seed: 3" in out
    assert "learning_rate: 0.0005" in out  # inherited from recipes/bert.yaml, as a float


def test_recipes_lists_the_shipped_recipes():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines()}
    assert lines["recipes/bert.yaml"] == "mlm" and lines["recipes/tiny/ner-lora.yaml"] == "ner"
    assert lines["recipes/accelerate/fsdp.yaml"] == "(accelerate)"
    assert "pretrain a small BERT" in result.output


def test_init_writes_a_starter_recipe_that_validates(tmp_path):
    from llmkit.config import load_recipe

    dest = tmp_path / "mine.yaml"
    result = runner.invoke(app, ["init", "ner", "--output", str(dest)])
    assert result.exit_code == 0, result.output
    text = dest.read_text()
    assert text.startswith(f"# {dest}: fine-tune a token classifier") and "llmkit finetune" in result.output
    assert load_recipe(dest).task == "ner"
    again = runner.invoke(app, ["init", "ner", "--output", str(dest)])
    assert again.exit_code == 2 and "exists" in again.stderr
    result = runner.invoke(app, ["init", "mlm", "--output", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0 and "llmkit pretrain" in result.output


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "llmkit", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"llmkit {__version__}"


def test_finetune_task_picks_the_shipped_recipe(engine):
    result = runner.invoke(app, ["finetune", "--task", "ner", "trainer.seed=5"])
    assert result.exit_code == 0, result.output
    recipe = engine[0][0]
    assert recipe.task == "ner" and recipe.recipe_file.endswith("recipes/ner.yaml") and recipe.trainer["seed"] == 5


def test_finetune_task_and_recipe_must_agree(engine):
    result = runner.invoke(app, ["finetune", str(RECIPES / "ner.yaml"), "--task", "classification"])
    assert result.exit_code == 2 and "--task classification disagrees" in result.stderr
    result = runner.invoke(app, ["finetune", "--task", "nerr"])
    assert result.exit_code == 2 and "did you mean 'ner'" in result.stderr


def test_predict_and_evaluate_need_a_run(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and "not an llmkit run" in result.stderr
    result = runner.invoke(app, ["predict", str(tmp_path), "--input", "x.jsonl", "--output", "y.jsonl"])
    assert result.exit_code == 2 and "not an llmkit run" in result.stderr


def test_quiet_and_verbose(engine, monkeypatch):
    monkeypatch.setenv("LLMKIT_VERBOSITY", "normal")
    result = runner.invoke(app, ["-q", "pretrain", str(RECIPES / "tiny/bert.yaml")])
    assert result.exit_code == 0, result.output
    recipe = engine[0][0]
    assert recipe.args.disable_tqdm is True
    assert "disable_tqdm" not in recipe.trainer  # how it runs is not part of the experiment
    result = runner.invoke(app, ["-q", "-v", "pretrain", str(RECIPES / "tiny/bert.yaml")])
    assert result.exit_code == 2


def test_an_interrupt_a_library_turned_into_its_own_error_still_exits_130(monkeypatch):
    # transformers' lazy imports re-raise what interrupted an import as ModuleNotFoundError
    from llmkit.errors import Terminated

    def lazy_import(recipe, **kwargs):
        try:
            raise Terminated
        except Terminated as e:
            raise ModuleNotFoundError("Could not import module 'TrainingArguments'") from e

    monkeypatch.setattr(llmkit_engine, "train", lazy_import)
    result = runner.invoke(app, ["pretrain", str(RECIPES / "tiny/bert.yaml")])
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted (SIGTERM)"


def test_a_sigterm_whose_exception_python_swallowed_still_exits_130(engine, monkeypatch):
    # A SIGTERM landing in a weakref callback or __del__ (an import's module-lock callback): Python prints
    # "Exception ignored" and the command carries on; it must still end as interrupted.
    import os
    import signal

    from llmkit.console import stop_on_sigterm

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes, here
                pass

    finish = llmkit_engine.train  # the engine fixture's stub: the command ends normally

    def train(recipe, **kwargs):
        SignalledWhileCollected()
        return finish(recipe, **kwargs)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        monkeypatch.setattr(llmkit_engine, "train", train)
        result = runner.invoke(app, ["pretrain", str(RECIPES / "tiny/bert.yaml")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM)"


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "-i", "in.jsonl", "-o", "out.jsonl"]])
def test_evaluate_and_predict_say_which_shipped_recipe_they_read(tmp_path, monkeypatch, command):
    """As the training commands do (README, Install): a recipe named by its shipped name logs the file it reads."""
    import logging

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMKIT_VERBOSITY", "normal")
    logging.getLogger("llmkit").setLevel(logging.WARNING)  # as in a fresh process: nothing set up yet
    result = runner.invoke(app, [command[0], "bert", "trainer.nosuch=1", *command[1:]])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[0].startswith("[llmkit] Reading llmkit's shipped recipe ")
    assert "bert.yaml" in result.stderr.splitlines()[0]
