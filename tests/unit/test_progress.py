"""Progress while training: a named bar with loss, lr and samples/s on a terminal; plain lines in pipes."""

import io
from types import SimpleNamespace

import pytest
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerControl, TrainerState

from llmkit import progress
from llmkit.progress import ProgressBar, ProgressLines, show_progress, transient_bar

ARGS = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1)


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def _train_two_steps(callback, clock, state):
    """Two optimizer steps of 0.5 s each, from step 0 of 10."""
    callback.on_train_begin(ARGS, state, TrainerControl())
    for _ in range(2):
        callback.on_step_begin(ARGS, state, TrainerControl())
        clock[0] += 0.5
        state.global_step += 1
        callback.on_step_end(ARGS, state, TrainerControl())


def test_lines_give_step_total_loss_lr_samples_per_second_and_eta(clock):
    out = io.StringIO()
    lines = ProgressLines(stream=out)
    state = TrainerState(max_steps=10)
    _train_two_steps(lines, clock, state)
    clock[0] += 3.0  # an evaluation or a checkpoint save between the steps does not count for samples/s
    lines.on_log(ARGS, state, TrainerControl(), logs={"loss": 0.5, "grad_norm": 1.5, "learning_rate": 1e-4})
    lines.on_log(ARGS, state, TrainerControl(), logs={"eval_loss": 0.4, "eval_accuracy": 0.9, "eval_runtime": 0.1})
    lines.on_train_end(ARGS, state, TrainerControl())
    lines.on_log(ARGS, state, TrainerControl(), logs={"eval_loss": 0.4})  # llmkit evaluate prints its own table
    assert out.getvalue().splitlines() == [
        "step 2/10 (20%)  loss 0.5  lr 1.00e-04  grad_norm 1.5  16.0 samples/s  0:04 elapsed, ETA 0:16",
        "step 2/10 (20%)  eval  loss 0.4  accuracy 0.9",
    ]
    assert "\r" not in out.getvalue()


def test_lines_come_from_the_main_process_only(clock):
    out = io.StringIO()
    lines = ProgressLines(stream=out)
    state = TrainerState(max_steps=10, is_world_process_zero=False)
    _train_two_steps(lines, clock, state)
    lines.on_log(ARGS, state, TrainerControl(), logs={"loss": 0.5})
    assert out.getvalue() == ""


def test_bar_shows_loss_lr_and_samples_per_second_and_writes_evaluations(clock, capsys):
    bar = ProgressBar()
    state = TrainerState(max_steps=10)
    _train_two_steps(bar, clock, state)
    assert bar.training_bar.desc.startswith("training") and bar.training_bar.n == 2
    bar.on_log(ARGS, state, TrainerControl(), logs={"loss": 0.5, "learning_rate": 1e-4, "grad_norm": 1.0})
    assert bar.training_bar.postfix == "loss=0.5, lr=1.00e-04, samples/s=16.0"
    bar.on_log(ARGS, state, TrainerControl(), logs={"eval_loss": 0.4, "eval_rougeL": 12.5})
    assert "step 2/10  eval  loss 0.4  rougeL 12.5" in capsys.readouterr().out
    bar.on_prediction_step(SimpleNamespace(predict_with_generate=True), state, TrainerControl(), eval_dataloader=[1, 2])
    assert bar.prediction_bar.desc.startswith("generating")
    bar.on_evaluate(ARGS, state, TrainerControl())
    bar.on_train_end(ARGS, state, TrainerControl())


class _Trainer:
    def __init__(self, disable_tqdm):
        self.args = SimpleNamespace(disable_tqdm=disable_tqdm)
        self.callbacks = [PrinterCallback() if disable_tqdm else ProgressCallback()]

    def remove_callback(self, cls):
        self.callbacks = [c for c in self.callbacks if not isinstance(c, cls)]

    def add_callback(self, callback):
        self.callbacks.append(callback)


@pytest.mark.parametrize(
    ("verbosity", "disable_tqdm", "expected"),
    [("normal", False, [ProgressBar]), ("normal", True, [ProgressLines]), ("quiet", True, [])],
)
def test_show_progress_picks_bar_lines_or_nothing(monkeypatch, verbosity, disable_tqdm, expected):
    monkeypatch.setenv("LLMKIT_VERBOSITY", verbosity)
    trainer = _Trainer(disable_tqdm)
    show_progress(trainer)
    assert [type(c) for c in trainer.callbacks] == expected


def test_library_bars_vanish_when_done_unless_told_otherwise():
    def factory(*args, **kwargs):
        return args, kwargs

    assert transient_bar(factory, ("x",), {"desc": "Writing model shards"}) == (
        ("x",),
        {"leave": False, "desc": "Writing model shards"},
    )
    assert transient_bar(factory, (), {"leave": True})[1] == {"leave": True}
