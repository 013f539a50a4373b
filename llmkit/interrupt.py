"""Safe interruption: the first Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and stops; a second quits at once."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("llmkit")


class StopOnSignal(TrainerCallback):
    """Asks the Trainer to save and stop at the end of the current step when a signal arrives.

    Every rank of a distributed run learns of it at the same step (the flag is all-reduced), so
    they save together. Use as a context manager around `trainer.train()`: the handlers are
    restored afterwards.
    """

    def __init__(self, world_size: int = 1) -> None:
        self.requested = False
        self.stopped = False
        self.world_size = world_size
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # the process group of the stop flag (on_train_begin)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt  # the second signal: quit now
        self.requested = True
        log.warning(
            "%s received: saving a checkpoint at the end of this step (again to quit at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Under several processes: the group the stop flag travels in, made once by every rank together.

        The flag is a CPU tensor, so it needs a CPU backend: the training group itself where that is gloo
        (CPU runs), else a gloo group beside it (NCCL has no CPU backend). Reducing a CPU tensor never
        waits for the GPU, so a step without a signal costs one small host-side all-reduce.
        """
        if self.world_size > 1:
            import torch.distributed as dist

            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return control

    def _any_rank_requested(self) -> bool:
        if self.world_size <= 1:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0])  # on the CPU, whatever device the model is on
        dist.all_reduce(flag, group=self._group)
        return flag.item() > 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._any_rank_requested():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control
