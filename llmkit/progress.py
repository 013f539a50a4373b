"""What a run shows while it trains: a live bar on a terminal, one plain line per log step in pipes."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from llmkit.hf import global_batch_size


def show_progress(trainer: Any) -> None:
    """Swap the Trainer's progress output for llmkit's: nothing under --quiet, else a bar or lines.

    `trainer.args.disable_tqdm` picks: llmkit's resolve turns it on in pipes and CI logs.
    """
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if os.environ.get("LLMKIT_VERBOSITY") != "quiet":
        trainer.add_callback(ProgressLines() if trainer.args.disable_tqdm else ProgressBar())


def transient_bar(factory: Any, args: tuple, kwargs: dict) -> Any:
    """transformers' tqdm hook: its own short bars (writing a checkpoint, loading weights) vanish when done.

    Otherwise every checkpoint save leaves a finished "Writing model shards" bar between the log lines.
    """
    return factory(*args, **{"leave": False, **kwargs})


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class _Throughput:
    """Training samples per second since the last log, timed over the optimizer steps themselves.

    Evaluations and checkpoint saves between steps would otherwise make the number jump at every one.
    """

    _busy, _steps, _began = 0.0, 0, None

    def _restart(self) -> None:
        self._busy, self._steps, self._began = 0.0, 0, None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._began = time.monotonic()
        return super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._began is not None:
            self._busy += time.monotonic() - self._began
            self._steps += 1
        return super().on_step_end(args, state, control, **kwargs)

    def _samples_per_second(self, args: Any) -> float | None:
        batch = global_batch_size(args)
        rate = self._steps * batch / self._busy if self._busy > 0 else None
        self._busy, self._steps = 0.0, 0
        return rate


def _is_step_log(logs: dict) -> bool:
    return "loss" in logs and "train_runtime" not in logs


def _eval_text(logs: dict) -> str:
    skip = ("_runtime", "_per_second", "_preparation_time")
    return "  ".join(
        f"{k.removeprefix('eval_')} {_fmt(v)}"
        for k, v in logs.items()
        if k.startswith("eval_") and not k.endswith(skip) and isinstance(v, (int, float))
    )


class ProgressBar(_Throughput, ProgressCallback):
    """The Trainer's bar, named, with loss, learning rate and samples/s; evaluations as one line above it."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("training")
        self._restart()

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        new = self.prediction_bar is None
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if new and self.prediction_bar is not None:
            generating = getattr(args, "predict_with_generate", False)
            self.prediction_bar.set_description("generating" if generating else "evaluating")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        bar = self.training_bar
        if not state.is_world_process_zero or bar is None or not logs:
            return  # outside training (llmkit evaluate) the command prints the metrics itself
        if _is_step_log(logs):
            speed = self._samples_per_second(args)
            parts = [f"loss={_fmt(logs['loss'])}"]
            if "learning_rate" in logs:
                parts.append(f"lr={logs['learning_rate']:.2e}")
            if speed:
                parts.append(f"samples/s={speed:.1f}")
            bar.set_postfix_str(", ".join(parts))
        elif any(k.startswith("eval_") for k in logs):
            bar.write(f"step {state.global_step}/{state.max_steps}  eval  {_eval_text(logs)}")


class ProgressLines(_Throughput, TrainerCallback):
    """Pipes and CI logs: one flushed line per log step (step/total, loss, lr, samples/s, ETA) and per evaluation."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.training = False

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)  # flushed: a pipe would hold lines back

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training, self.started, self.first_step = True, time.monotonic(), state.global_step
        self._restart()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.training or not logs:
            return  # outside training (llmkit evaluate) the command prints the metrics itself
        step, total = state.global_step, state.max_steps
        head = f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"
        if _is_step_log(logs):
            speed = self._samples_per_second(args)
            parts = [head, f"loss {_fmt(logs['loss'])}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if "grad_norm" in logs:
                parts.append(f"grad_norm {_fmt(logs['grad_norm'])}")
            if speed:
                parts.append(f"{speed:.1f} samples/s")
            done = step - self.first_step
            elapsed = time.monotonic() - self.started
            eta = f", ETA {_clock(elapsed / done * (total - step))}" if done > 0 else ""
            parts.append(f"{_clock(elapsed)} elapsed{eta}")
            self._print("  ".join(parts))
        elif any(k.startswith("eval_") for k in logs):
            self._print(f"{head}  eval  {_eval_text(logs)}")
