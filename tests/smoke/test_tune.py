"""`llmkit tune` on the tiny classification recipe: a study, its continuation, a dead trial retried, bad spaces,
the pruning callback (offline, seconds per trial)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import RECIPES, ROOT

from llmkit import tune as tuning
from llmkit import tune_study
from llmkit.config import load_recipe
from llmkit.errors import LlmkitError, RecipeError
from llmkit.search import parse_search

pytestmark = pytest.mark.smoke
TINY = RECIPES / "tiny" / "classification-tune.yaml"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _plan(out, trials, *overrides):
    return tuning.plan(tuning.load(TINY, [f"trainer.output_dir={out}", *overrides]), trials, None, None)


def _trials(out):
    return json.loads((out / "trials.json").read_text())["trials"]


def test_a_study_runs_continues_and_leaves_its_results(tmp_path):
    out = tmp_path / "study"
    study = tuning.run(_plan(out, 3))
    rows = _trials(out)
    assert [(r["number"], r["state"]) for r in rows] == [(0, "complete"), (1, "complete"), (2, "complete")]
    for r in rows:  # each trial is an ordinary run with the trial's values in its saved recipe
        run = out / f"trial-{r['number']}"
        assert r["output_dir"] == str(run) and (run / "summary.json").exists()
        saved = load_recipe(run / "recipe.yaml")
        assert saved.trainer["learning_rate"] == r["params"]["trainer.learning_rate"]
        assert json.loads((run / "summary.json").read_text())["final_metrics"]["eval_accuracy"] == r["value"]
    best = study.best_trial
    recipe = load_recipe(out / "best.yaml")  # ready for `llmkit finetune`
    assert recipe.trainer["learning_rate"] == best.params["trainer.learning_rate"] and recipe.search is None
    assert recipe.output_dir == out / "best"
    assert {p.name for p in (out / "plots").iterdir()} == {
        "objective.png",
        "trainer.learning_rate.png",
        "trainer.warmup_steps.png",
    }
    card = (out / f"trial-{best.number}" / "README.md").read_text()
    assert "## Hyperparameter search" in card and "Best of 3 trials" in card

    # The same command on the folder continues the study up to the new count; nothing is repeated.
    again = tuning.plan(tuning.load(out, []), 4, None, None)
    assert again.storage == f"sqlite:///{(out / 'study.db').resolve()}" and again.study == "study"
    tuning.run(again)
    rows = _trials(out)
    assert [r["number"] for r in rows] == [0, 1, 2, 3] and all(r["state"] == "complete" for r in rows)
    assert rows[3]["params"] not in [r["params"] for r in rows[:3]]  # a seeded sampler does not replay
    tuning.run(again)  # already there: no trial runs
    assert _trials(out) == rows


def test_a_trial_left_running_by_a_dead_process_is_failed_and_retried(tmp_path):
    out = tmp_path / "study"
    p = _plan(out, 1)
    p.folder.mkdir(parents=True)
    study, _ = tune_study.open_study(p, quiet=())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
        trial = study.ask()  # what a killed `llmkit tune` leaves: a RUNNING trial of its pid
    values = {s.key: tuning.search.suggest(trial, s) for s in p.spaces}
    trial.set_user_attr("host", __import__("socket").gethostname())
    trial.set_user_attr("pid", dead.pid)
    tuning.run(p)
    rows = _trials(out)
    assert [(r["number"], r["state"]) for r in rows] == [(0, "fail"), (1, "complete")]
    assert rows[1]["params"] == values and rows[1]["retry_of"] == 0  # the same values, run again


@pytest.mark.parametrize(
    "search, message",
    [
        ("{trainer.learnig_rate: {float: [0.1, 0.2]}}", "search.trainer.learnig_rate = 0.1: unknown"),
        ("{trainer.learning_rate: {float: [0.2, 0.1]}}", "search.trainer.learning_rate: low must be below high"),
        ("{trainer.learning_rate: {floot: [0.1, 0.2]}}", "give exactly one of float, int or choice"),
        ("{trainer.seed: {int: [1, 5], log: yes, step: 2}}", "step must be a positive int (and not with log: true)"),
        ("{trainer.learning_rate: {float: [0, 0.1], log: true}}", "a log space needs low > 0"),
        ("{options.problem_type: {choice: [single_label_classification, regression]}}", "search.options.problem_type"),
        ("{}", "llmkit tune needs a search: section"),
    ],
)
def test_a_bad_search_is_one_line_before_any_trial(tmp_path, search, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        _plan(tmp_path / "s", 2, f"search={search}")
    assert not (tmp_path / "s").exists()


def test_nested_search_keys_read_as_dotted_ones():
    spaces = parse_search(
        {"trainer": {"learning_rate": {"float": [1e-5, 1e-3], "log": True}}, "peft.r": {"int": [4, 8]}}
    )
    assert [(s.key, s.kind, s.log) for s in spaces] == [
        ("trainer.learning_rate", "float", True),
        ("peft.r", "int", False),
    ]


def test_the_pruner_hears_each_evaluation_once_and_stops_training():
    reports = []
    trial = SimpleNamespace(report=lambda value, step: reports.append((step, value)), should_prune=lambda: step > 2)
    listener = tuning.pruning_callback(trial, "eval_accuracy")
    for step in (2, 4, 4):  # the final evaluation repeats the last step
        state, control = SimpleNamespace(global_step=step, max_steps=8), SimpleNamespace(should_training_stop=False)
        listener.on_evaluate(None, state, control, metrics={"eval_accuracy": step / 10})
        if step == 2:
            assert not control.should_training_stop
    assert reports == [(1, 0.2), (2, 0.4)] and listener.pruned_at == 2  # by evaluation, not by step
    with pytest.raises(RecipeError, match="tune.objective eval_accuracy is not among the evaluation's metrics"):
        fresh = tuning.pruning_callback(trial, "eval_accuracy")
        fresh.on_evaluate(None, SimpleNamespace(global_step=2, max_steps=8), control, metrics={"eval_f1": 0.5})


def test_dry_run_and_a_folder_that_is_no_study(tmp_path):
    text = tuning.describe(_plan(tmp_path / "s", 4))
    assert "trainer.learning_rate: float in [0.0001, 0.01], log" in text and "first 3 sampled:" in text
    assert "maximize eval_accuracy over 4 trials" in text
    with pytest.raises(LlmkitError, match="holds no tune.yaml, so it is not a study folder"):
        tuning.load(tmp_path, [])


def test_an_extending_recipe_or_an_override_replaces_a_space_whole(tmp_path, write):
    child = write("child.yaml", f"extends: {TINY}\nsearch:\n  trainer.learning_rate: {{choice: [0.001, 0.01]}}\n")
    p = tuning.plan(tuning.load(child, [f"trainer.output_dir={tmp_path / 's'}"]), 2, None, None)
    spaces = {s.key: (s.kind, s.edges()) for s in p.spaces}
    assert spaces["trainer.learning_rate"] == ("choice", [0.001, 0.01])  # not mixed with the parent's float
    assert spaces["trainer.warmup_steps"] == ("choice", [0.0, 0.1])  # the parent's other entry stays
    p = _plan(tmp_path / "o", 2, "search.trainer.learning_rate={float: [0.001, 0.002]}")
    assert [(s.key, s.kind, s.low) for s in p.spaces][0] == ("trainer.learning_rate", "float", 0.001)
    assert len(p.spaces) == 2
