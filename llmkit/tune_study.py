"""The study of `llmkit tune` in its database: opened (or created) with heartbeats and retries, checked to be the
same search, its sampler seeded per trial, and the trials of dead local processes failed and retried."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import warnings
from typing import Any

from llmkit.errors import LlmkitError, first_line

HEARTBEAT_S = 20  # a trial running elsewhere is stale after 3 missed heartbeats
RETRIES = 2


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LlmkitError("llmkit tune needs optuna, which is not installed; pip install 'llmkit[tune]'") from None
    return optuna


def shown(url: str) -> str:
    """A storage URL as it may be printed: without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: shown as given (it holds no password then)
        return url


def make_sampler(kind: str, seed: int | None) -> Any:
    """The sampler; with a seed, each trial's draws are seeded by seed + its number: reproducible, and different
    in every worker of a shared study and on every continuation (a per-process seed would replay them)."""
    optuna = import_optuna()
    cls = optuna.samplers.RandomSampler if kind == "random" else optuna.samplers.TPESampler
    if seed is None:
        return cls()

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.inner = cls(seed=seed)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            return self.inner.sample_independent(study, trial, name, distribution)

        def before_trial(self, study: Any, trial: Any) -> None:
            self.inner = cls(seed=seed + trial.number)
            self.inner.before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

    return PerTrialSeed()


class _QuietTrialEnds(logging.Filter):
    """Optuna logs each caught trial exception with its traceback; llmkit says what happened in one line."""

    def __init__(self, quiet: tuple) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], self.quiet))


def _storage(url: str) -> Any:
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):  # workers starting together race to create the schema: the losers try again
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=3 * HEARTBEAT_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=RETRIES),
            )
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors for a bad URL, a server down, a race
            if attempt == 4 or not any(w in str(e) for w in ("UNIQUE", "already exists", "locked", "duplicate")):
                raise LlmkitError(f"cannot open the study storage {shown(url)!r}: {first_line(e)}") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def open_study(p: Any, quiet: tuple) -> tuple[Any, Any]:
    """The Optuna study (created or continued) and its storage. A continued study must search the same
    objective over the same spaces."""
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # llmkit says what each trial did
    optuna.logging.get_logger("optuna").addFilter(_QuietTrialEnds(quiet))
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since v2
    storage = _storage(p.storage)
    s = p.settings
    pruner = optuna.pruners.NopPruner() if s.pruner == "none" else optuna.pruners.MedianPruner(n_startup_trials=3)
    study = optuna.create_study(
        storage=storage,
        study_name=p.study,
        load_if_exists=True,
        direction=p.direction,
        sampler=make_sampler(s.sampler, s.seed),
        pruner=pruner,
    )
    what = {"objective": p.objective, "search": {space.key: space.describe() for space in p.spaces}}
    before = study.user_attrs.get("llmkit")
    if before is None:
        study.set_user_attr("llmkit", what)
    elif before != what:
        raise LlmkitError(
            f"study {p.study!r} searches {before['objective']} over {', '.join(before['search'])}, not this recipe's "
            f"{p.objective} over {', '.join(what['search'])}; name another study (--study) or output folder"
        )
    if study.direction.name.lower() != p.direction:
        raise LlmkitError(
            f"study {p.study!r} {study.direction.name.lower()}s its objective; this recipe {p.direction}s"
        )
    return study, storage


def fail_dead_trials(study: Any, storage: Any) -> list[int]:
    """Trials left RUNNING by a process of this machine that is gone (killed, crashed): failed now and retried
    with the same values. Returns their numbers. (Other machines' trials: Optuna's heartbeat, after its grace.)"""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    now = datetime.datetime.now()
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        # A retry carries the failed trial's pid until the worker that took it writes its own: not dead then.
        fresh = t.datetime_start is not None and (now - t.datetime_start).total_seconds() < HEARTBEAT_S
        if host != socket.gethostname() or pid is None or (fresh and "failed_trial" in t.system_attrs) or _alive(pid):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)(study, storage.get_trial(trial_id))
                dead.append(t.number)
        except (UpdateFinishedTrialError, RuntimeError):  # another worker failed it first
            continue
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
