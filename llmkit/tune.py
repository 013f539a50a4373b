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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit import config, engine, search, tune_report
from llmkit.errors import LlmkitError, RecipeError, first_line
from llmkit.recipe import Recipe, TuneSection
from llmkit.recipefile import apply_overrides, dump_yaml
from llmkit.tasks import get_task

log = logging.getLogger("llmkit")

SAVED = "tune.yaml"  # the study's recipe (with search: and tune:), in its output folder
HEARTBEAT_S = 20  # a trial running elsewhere is stale after 3 missed heartbeats
RETRIES = 2


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

    @property
    def folder(self) -> Path:
        return self.recipe.output_dir


class Surplus(Exception):
    """A trial started while other processes already had the requested count under way."""


def load(target: Path, overrides: list[str]) -> Recipe:
    """The study's recipe: a recipe file, or the output folder of an earlier `llmkit tune` (its tune.yaml)."""
    target = Path(target)
    if target.is_dir():
        if not (target / SAVED).is_file():
            raise LlmkitError(f"{target} holds no {SAVED}, so it is not a study folder; pass the recipe file instead")
        target = target / SAVED
    return config.load_recipe(target, overrides)


def plan(recipe: Recipe, trials: int | None, storage: str | None, study: str | None) -> Plan:
    """Check the search (spaces, keys, values at their edges) and settle objective, direction and storage."""
    settings = recipe.tune or TuneSection()
    spaces = search.parse_search(recipe.search)
    objective = settings.objective or get_task(recipe.task).main_metric
    objective = objective if objective.startswith("eval_") else f"eval_{objective}"
    direction = settings.direction or ("minimize" if "loss" in objective or "perplexity" in objective else "maximize")
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


def open_study(p: Plan) -> tuple[Any, Any]:
    """The Optuna study (created or continued) and its storage, with heartbeats and retries of dead trials."""
    optuna = import_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # llmkit says what each trial did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since v2
    engine_kwargs = {"connect_args": {"timeout": 60}} if p.storage.startswith("sqlite") else {}
    for attempt in range(5):  # workers starting together race to create the schema: the losers try again
        try:
            storage = RDBStorage(
                p.storage,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=3 * HEARTBEAT_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=RETRIES),
            )
            break
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors for a bad URL, a server down, a race
            if attempt == 4 or not any(w in str(e) for w in ("UNIQUE", "already exists", "locked", "duplicate")):
                raise LlmkitError(f"cannot open the study storage {p.storage!r}: {first_line(e)}") from None
            time.sleep(0.5 + attempt)
    s = p.settings
    pruner = optuna.pruners.NopPruner() if s.pruner == "none" else optuna.pruners.MedianPruner(n_startup_trials=3)
    study = optuna.create_study(
        storage=storage, study_name=p.study, load_if_exists=True, direction=p.direction, pruner=pruner
    )
    study.sampler = make_sampler(s, worker_seed(s.seed, study))
    if study.direction.name.lower() != p.direction:
        raise LlmkitError(
            f"study {p.study!r} {study.direction.name.lower()}s its objective; this recipe {p.direction}s"
        )
    return study, storage


def make_sampler(settings: TuneSection, seed: int | None) -> Any:
    import optuna

    kind = optuna.samplers.RandomSampler if settings.sampler == "random" else optuna.samplers.TPESampler
    return kind(seed=seed)


def worker_seed(seed: int | None, study: Any) -> int | None:
    """tune.seed for this worker: offset by the trials the study already has, so a continued study draws new
    values instead of replaying its first ones, and by the process id when other workers are running."""
    from optuna.trial import TrialState

    if seed is None:
        return None
    trials = study.get_trials(deepcopy=False)
    running = any(t.state == TrialState.RUNNING for t in trials)
    return seed + len(trials) + (os.getpid() if running else 0)


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LlmkitError("llmkit tune needs optuna, which is not installed; pip install 'llmkit[tune]'") from None
    return optuna


def fail_dead_trials(study: Any, storage: Any) -> list[int]:
    """Trials left RUNNING by a process of this machine that is gone (killed, crashed): failed now and
    retried. Returns their numbers. (Trials of other machines: Optuna's heartbeat, after its grace period.)"""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not _alive(pid):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)(study, storage.get_trial(trial_id))
                dead.append(t.number)
    return dead


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a pid reused by this very process: the trial's process is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(study: Any) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def run(p: Plan) -> Any:
    """Run trials until the study has `p.trials` finished ones; write the results. Returns the study."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    p.folder.mkdir(parents=True, exist_ok=True)
    # The study's recipe, with where the study is: `llmkit tune FOLDER` continues this study, not a new one.
    saved = {**p.recipe.raw, "tune": {**(p.recipe.raw.get("tune") or {}), "storage": p.storage, "study": p.study}}
    (p.folder / SAVED).write_text(dump_yaml(saved), encoding="utf-8")
    study, storage = open_study(p)
    for number in fail_dead_trials(study, storage):
        log.warning("trial %d was left running by a process that is gone: marked failed, retried", number)
    if len(finished(study)) < p.trials:
        stop = MaxTrialsCallback(p.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
        study.optimize(
            lambda trial: objective(p, study, trial),
            callbacks=[stop, lambda s, t: tune_report.write(p, s)],
            catch=(Surplus,),
            gc_after_trial=True,
        )
    else:
        log.info("study %r already has %d finished trials (--trials %d)", p.study, len(finished(study)), p.trials)
    tune_report.write(p, study, final=True)
    return study


def objective(p: Plan, study: Any, trial: Any) -> float:
    """One trial: its values, an ordinary run in trial-N with the pruner listening, the objective's value."""
    import optuna
    from optuna.trial import TrialState

    ahead = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    if len([t for t in ahead if t.number < trial.number]) >= p.trials:  # the others already have the count
        trial.set_user_attr("surplus", True)
        study.stop()
        raise Surplus
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    values = {space.key: search.suggest(trial, space) for space in p.spaces}
    out = p.folder / f"trial-{trial.number}"
    trial.set_user_attr("output_dir", str(out))
    done = finished(study)
    log.info(
        "trial %d (%d/%d finished, %s): %s",
        trial.number,
        len(done),
        p.trials,
        tune_report.best_so_far(p, study),
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
    )
    listener = pruning_callback(trial, p.objective)
    summary = engine.train(trial_recipe(p.recipe, values, out), callbacks=[listener])
    metrics = summary.get("final_metrics", {})
    if p.objective not in metrics:
        raise RecipeError(f"tune.objective {p.objective} is not a metric of this task: {', '.join(sorted(metrics))}")
    trial.set_user_attr("steps", summary["steps"])
    trial.set_user_attr("value", metrics[p.objective])
    if listener.pruned_at is not None:
        raise optuna.TrialPruned(f"behind the median at step {listener.pruned_at}")
    return metrics[p.objective]


def pruning_callback(trial: Any, key: str) -> Any:
    """A Trainer callback: each evaluation's objective reported to the pruner; training stops when it prunes."""
    from transformers import TrainerCallback

    class ReportToPruner(TrainerCallback):
        pruned_at: int | None = None
        reported: set = set()

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
            if self.pruned_at is not None or not metrics or key not in metrics or state.global_step in self.reported:
                return
            self.reported = self.reported | {state.global_step}  # the final evaluation repeats the last step
            trial.report(metrics[key], state.global_step)
            if state.global_step < state.max_steps and trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return ReportToPruner()


def describe(p: Plan, samples: int = 3) -> str:
    """--dry-run: the study's settings, each space, and the first values the sampler would try."""
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = p.settings
    scratch = optuna.create_study(
        sampler=make_sampler(s, s.seed), direction=p.direction
    )  # in memory: nothing is stored
    lines = [
        f"study {p.study!r} in {p.storage}: {p.direction} {p.objective} over {p.trials} trials "
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
