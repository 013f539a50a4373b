"""`llmkit tune`: a hyperparameter search over a recipe's `search:` section, on Optuna (the `tune` extra).

Each trial is an ordinary llmkit run in OUTPUT_DIR/trial-N (its recipe, summary and model card), trained in
this process; its evaluations report to the pruner, which may stop it early. The study lives in a database:
SQLite in OUTPUT_DIR by default, or any RDB URL Optuna takes, so the same command continues it and several
processes (on several machines) share it. `--trials N` is the number of finished (complete or pruned) trials
the study should reach: running again finishes what is missing. A trial whose process died is marked failed
and retried with the same values: at once when it ran on this machine, after the heartbeat's grace period
when it ran elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit import config, engine, search, tune_report, tune_study
from llmkit.errors import Interrupted, LlmkitError, RecipeError, Terminated, first_line
from llmkit.files import atomic_write
from llmkit.recipe import Recipe, TuneSection
from llmkit.recipefile import apply_overrides, dump_yaml
from llmkit.tasks import get_task

log = logging.getLogger("llmkit")

SAVED = "tune.yaml"  # the study's recipe (with search: and tune:), in its output folder


@dataclass
class Plan:
    """What a study searches and how: resolved from the recipe's search: and tune: sections and the flags."""

    recipe: Recipe
    spaces: list
    objective: str
    direction: str
    trials: int
    storage: str
    study: str
    settings: TuneSection
    failures: int = 0  # trials failed in a row in this process
    db: Any = None  # the study's storage, once open

    @property
    def folder(self) -> Path:
        return self.recipe.output_dir


class Surplus(Exception):
    """A trial started after the study had its count (other workers finished the last places)."""


class TrialFailed(Exception):
    """One trial failed (said in one line); the study goes on."""


class ObjectiveMissing(RecipeError):
    """tune.objective names no metric the runs compute: every trial would fail alike, so the study stops."""


def load(target: Path, overrides: list[str]) -> Recipe:
    """The study's recipe: a recipe file, or the output folder of an earlier `llmkit tune` (its tune.yaml)."""
    target = Path(target)
    if target.is_dir():
        if not (target / SAVED).is_file():
            raise LlmkitError(f"{target} holds no {SAVED}, so it is not a study folder; pass the recipe file instead")
        overrides = [f"trainer.output_dir={target}", *overrides]  # the folder as named now, from any working folder
        target = target / SAVED
    return config.load_recipe(target, overrides)


def plan(recipe: Recipe, trials: int | None, storage: str | None, study: str | None) -> Plan:
    """Check the search (spaces, keys, values at their edges) and settle objective, direction and storage."""
    settings = recipe.tune or TuneSection()
    spaces = search.parse_search(recipe.search)
    objective = settings.objective or get_task(recipe.task).main_metric
    objective = objective if objective.startswith("eval_") else f"eval_{objective}"
    lower = ("loss", "perplexity", "wer", "cer", "ter", "mse", "mae", "rmse", "error")
    direction = settings.direction or ("minimize" if any(w in objective for w in lower) else "maximize")
    for space in spaces:
        for value in space.edges():
            try:
                trial_recipe(recipe, {space.key: value}, Path(recipe.output_dir) / "check")
            except LlmkitError as e:
                raise RecipeError(f"search.{space.key} = {value!r}: {first_line(e)}") from None
    out = recipe.output_dir
    url = storage or settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    return Plan(
        recipe,
        spaces,
        objective,
        direction,
        trials or settings.trials,
        url,
        study or settings.study or out.name,
        settings,
    )


def trial_recipe(recipe: Recipe, values: dict, out: Path) -> Recipe:
    """The recipe of one trial: the study's, without search: and tune:, with the trial's values, in `out`."""
    raw = {k: v for k, v in recipe.raw.items() if k not in ("search", "tune")}
    raw = apply_overrides(raw, [*search.overrides(values), f"trainer.output_dir={out}"])
    return config.resolve(config.validate(raw, recipe.recipe_file))


def finished(study: Any) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def run(p: Plan) -> Any:
    """Run trials until the study has `p.trials` finished ones; write the results. Returns the study."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlmkitError("llmkit tune runs each trial in one process; start it without torchrun/accelerate")
    p.folder.mkdir(parents=True, exist_ok=True)  # (the default SQLite database lives in it)
    study, p.db = tune_study.open_study(p, quiet=(Surplus, TrialFailed))
    if not study.get_trials(deepcopy=False) and list(p.folder.glob("trial-*")):
        raise LlmkitError(f"{p.folder} holds the trials of another study; choose another output folder")
    # The study's recipe, with where the study is: `llmkit tune FOLDER` continues this study, not a new one.
    saved = {**p.recipe.raw, "tune": {**(p.recipe.raw.get("tune") or {}), "storage": p.storage, "study": p.study}}
    atomic_write(p.folder / SAVED, dump_yaml(saved))
    for number in tune_study.fail_dead_trials(study, p.db):
        log.warning("trial %d was left running by a process that is gone: marked failed, retried", number)
    if len(finished(study)) < p.trials:
        stop = MaxTrialsCallback(p.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
        try:
            study.optimize(
                lambda trial: objective(p, study, trial),
                callbacks=[stop, lambda s, t: tune_report.write(p, s)],
                catch=(Surplus, TrialFailed),
                gc_after_trial=True,
            )
        except (Interrupted, KeyboardInterrupt, Terminated):
            _requeue_interrupted(study)
            tune_report.write(p, study)
            raise KeyboardInterrupt from None  # exit 130; `llmkit tune FOLDER` continues the study
    else:
        log.info("study %r already has %d finished trials (--trials %d)", p.study, len(finished(study)), p.trials)
    tune_report.write(p, study, final=True)
    return study


def _requeue_interrupted(study: Any) -> None:
    """Ctrl-C or SIGTERM stopped this process's trial: its values run again when the study continues."""
    from optuna.trial import TrialState

    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("pid") == os.getpid()]
    if mine and mine[-1].state in (TrialState.FAIL, TrialState.RUNNING):
        study.enqueue_trial(mine[-1].params, skip_if_exists=False)
        log.warning("trial %d interrupted: `llmkit tune` on this study runs its values again", mine[-1].number)


def _wait_for_a_slot(p: Plan, study: Any, trial: Any) -> bool:
    """Whether this trial should run: not when the study has its count; when trials of other workers still
    run for the last places, wait (retrying those whose heartbeat stopped) until one of them ends."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    waited = 0
    while len(finished(study)) < p.trials:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        ahead = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < trial.number]
        if len(ahead) < p.trials:
            return True
        time.sleep(2)
        waited += 2
        if waited % tune_study.HEARTBEAT_S == 0:
            fail_stale_trials(study)  # other machines' trials whose heartbeat stopped
            tune_study.fail_dead_trials(study, p.db)  # this machine's
    return False


def objective(p: Plan, study: Any, trial: Any) -> float:
    """One trial: its values, an ordinary run in trial-N with the pruner listening, the objective's value."""
    import optuna

    if not _wait_for_a_slot(p, study, trial):
        trial.set_user_attr("surplus", True)
        study.stop()
        raise Surplus
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    values = {space.key: search.suggest(trial, space) for space in p.spaces}
    out = p.folder / f"trial-{trial.number}"
    trial.set_user_attr("output_dir", str(out.resolve()))
    log.info(
        "trial %d (%d/%d finished, %s): %s",
        trial.number,
        len(finished(study)),
        p.trials,
        tune_report.best_so_far(p, study),
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
    )
    listener = pruning_callback(trial, p.objective)
    summary = _train_trial(p, trial, trial_recipe(p.recipe, values, out), listener)
    value = summary["final_metrics"].get(p.objective)
    if value is None:
        raise ObjectiveMissing(
            f"tune.objective {p.objective} is not among the final metrics: {', '.join(sorted(summary['final_metrics']))}"
        )
    trial.set_user_attr("steps", summary["steps"])
    trial.set_user_attr("value", value)
    if listener.pruned_at is not None:
        raise optuna.TrialPruned(f"behind the median at evaluation {listener.pruned_at}")
    return value


def _train_trial(p: Plan, trial: Any, recipe: Recipe, listener: Any) -> dict:
    """engine.train; a trial that fails (a value the run rejects, out of memory, a diverged run) is one failed
    trial and the study goes on, unless three fail in a row."""
    try:
        summary = engine.train(recipe, callbacks=[listener])
    except ObjectiveMissing:
        raise
    except (LlmkitError, RuntimeError) as e:
        p.failures += 1
        log.warning("trial %d failed: %s", trial.number, first_line(e))
        if p.failures >= 3:
            raise LlmkitError(
                f"3 trials in a row failed, the last with: {first_line(e)}; fix the recipe or the search"
            ) from None
        raise TrialFailed from e
    p.failures = 0
    return summary


def pruning_callback(trial: Any, key: str) -> Any:
    """A Trainer callback: each evaluation's objective reported to the pruner (by evaluation count, which is
    comparable across trials of different batch sizes); training stops when it prunes."""
    from transformers import TrainerCallback

    from llmkit.metrics import with_perplexity

    class ReportToPruner(TrainerCallback):
        pruned_at: int | None = None
        evaluations = 0
        last_step = -1

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
            if self.pruned_at is not None or not metrics or state.global_step == self.last_step:
                return  # (the final evaluation repeats the last step's)
            metrics = with_perplexity(metrics)
            if key not in metrics:
                raise ObjectiveMissing(
                    f"tune.objective {key} is not among the evaluation's metrics: {', '.join(sorted(metrics))}"
                )
            self.last_step, self.evaluations = state.global_step, self.evaluations + 1
            trial.report(metrics[key], self.evaluations)
            if state.global_step < state.max_steps and trial.should_prune():
                self.pruned_at = self.evaluations
                control.should_training_stop = True

    return ReportToPruner()


def describe(p: Plan, samples: int = 3) -> str:
    """--dry-run: the study's settings, each space, and the first values the sampler would try."""
    optuna = tune_study.import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = p.settings
    # In memory (nothing is stored): the sampler's first draws, as trials 0, 1, ... of a new study get them.
    scratch = optuna.create_study(sampler=tune_study.make_sampler(s.sampler, s.seed), direction=p.direction)
    lines = [
        f"study {p.study!r} in {tune_study.shown(p.storage)}: {p.direction} {p.objective} over {p.trials} trials "
        f"({s.sampler} sampler, {s.pruner} pruner); trials in {p.folder}/trial-N",
        "search:",
        *[f"  {space.key}: {space.describe()}" for space in p.spaces],
        f"first {samples} sampled:",
    ]
    for i in range(samples):
        trial = scratch.ask()
        values = {space.key: search.suggest(trial, space) for space in p.spaces}
        lines.append(f"  {i}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    return "\n".join(lines)
