"""Streaming pretraining (`data.streaming: true`): a corpus larger than memory, read as training goes.

The training split is a `datasets` IterableDataset, tokenized and packed into blocks on the fly by the task's own
packing, in a dataloader worker (off the training thread). Each process reads its own part of the stream
(`split_dataset_by_node`: whole files when their number divides by the processes, else every N-th block), and the
stream repeats, so `trainer.max_steps` alone says how long a run is. Validation is a fixed held-out slice read
into memory: the first `data.max_eval_samples` rows (1,000 unless set) of the validation split, or of the training
stream when the data has none (training then starts after them).

The stream's position is checkpointed: every checkpoint holds each process's dataloader state (torchdata's
StatefulDataLoader, through Accelerate), and a resumed run restores it instead of re-reading what was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.data import is_stream, load_streams, require_columns, split_origin
from llmkit.errors import DataError, RecipeError, first_line
from llmkit.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from llmkit.recipe import Recipe
    from llmkit.tasks.base import Task

log = logging.getLogger("llmkit")

HELD_OUT = 1000  # rows of validation when data.max_eval_samples does not say
STATE = "stream_state_{}.pt"  # in each checkpoint, one per process


def check(recipe: Recipe, task: Task, args: Any) -> None:
    """A stream trains a pretraining task for a set number of steps."""
    if not task.tokens_per_sample:
        raise RecipeError(
            f"data.streaming is for pretraining (packed text): task {task.name!r} reads its rows into memory; "
            "set data.streaming=false"
        )
    if args.max_steps is None or args.max_steps <= 0:
        raise RecipeError(
            "data.streaming needs trainer.max_steps: a stream has no length to count epochs by; set trainer.max_steps=N"
        )


def load(recipe: Recipe, task: Task, args: Any, only: str | None = None) -> tuple[Any, dict, dict]:
    """(tokenizer, {split: blocks}, preflight report) of a streamed recipe: train a stream of packed blocks split
    between the processes, every other split a held-out slice in memory."""
    from datasets import Dataset
    from datasets.distributed import split_dataset_by_node

    check(recipe, task, args)
    streams = load_streams(recipe)
    column = task.column(recipe, "text")
    for split, stream in streams.items():
        require_columns(stream, {"text": column}, split_origin(recipe, split))
    size = recipe.data.max_eval_samples or HELD_OUT
    train = streams.pop("train")
    carved = "validation" not in streams
    if carved:
        streams["validation"], train = train.take(size), train.skip(size)
    held = {split: Dataset.from_dict({column: [r[column] for r in s.take(size)]}) for split, s in streams.items()}
    if recipe.data.max_train_samples is not None:
        train = train.take(recipe.data.max_train_samples)  # the stream repeats these rows
    tokenizer = get_tokenizer(recipe, task, train)
    if args.world_size > 1:
        train = split_dataset_by_node(train, rank=args.process_index, world_size=args.world_size)
    if only is not None and only not in held:  # `evaluate --split`: the train stream never ends
        raise DataError(
            f"the data has no {only!r} split held in memory (streamed: train; held out: {', '.join(held)}); "
            "pick another --split, or name the file with data.test=PATH"
        )
    todo = {only: held[only]} if only else {"train": train, **held}
    tokenized = task.preprocess(recipe, todo, tokenizer)
    if "train" in tokenized:
        if next(iter(tokenized["train"]), None) is None:
            raise DataError(
                f"the {split_origin(recipe, 'train')} gives no block of data.max_length={recipe.data.max_length} "
                "tokens after the held-out rows; add text or lower data.max_length"
            )
        tokenized["train"] = tokenized["train"].repeat(None)  # max_steps ends the run, on every process alike
        if "dataloader_num_workers" not in recipe.trainer:
            args.dataloader_num_workers = 1  # tokenizing off the training thread
    report = {
        "streaming": True,
        "held_out_rows": {split: len(d) for split, d in held.items()},
        "validation_from": "the first rows of the train stream (training starts after them)"
        if carved
        else "validation",
    }
    return tokenizer, tokenized, report


@contextmanager
def read_errors(recipe: Recipe) -> Iterator[None]:
    """A stream is read while it trains: a file that turns out unreadable there (bytes that are not UTF-8, a
    broken JSON line) stops the run with one line naming the split's files (exit 2), not a worker's traceback.
    The last checkpoint stays: fix the file, then --resume."""
    try:
        yield
    except Exception as e:
        text = str(e)
        if not recipe.data.streaming or not (isinstance(e, UnicodeDecodeError) or "DataLoader worker" in text):
            raise
        reason = next((ln for ln in text.splitlines() if "Error" in ln and "Caught" not in ln), first_line(e))
        raise DataError(
            f"reading the stream of the {split_origin(recipe, 'train')} failed: {reason.strip()}; "
            "fix or re-save the file (UTF-8 text; JSON: one object per line), then resume with --resume"
        ) from None


class ResumesStreams:
    """Trainer mixin: a streamed train dataset is read by a stateful dataloader (torchdata, through Accelerate),
    whose state each checkpoint keeps per process; a resumed run loads it rather than skipping batches by reading
    them again. Map-style datasets are left to the Trainer."""

    _stream_state: Path | None = None

    def _streaming(self) -> bool:
        return is_stream(self.train_dataset)

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        if self._streaming() and isinstance(resume_from_checkpoint, (str, Path)):
            self._stream_state = _state_file(Path(resume_from_checkpoint), self.args)
            self.args.ignore_data_skip = True  # the position comes from the state: nothing to read past
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_train_dataloader(self) -> Any:
        if not self._streaming():
            return super().get_train_dataloader()
        import warnings

        import torch
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        args = self.args
        workers = args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
        )
        # This process's part of the stream is its own already (load): Accelerate only places the batches.
        loader = prepare_data_loader(
            loader,
            device=self.accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
            use_stateful_dataloader=True,
        )
        warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")  # torchdata 0.11 on torch 2.13
        if self._stream_state is not None:
            loader.load_state_dict(torch.load(self._stream_state, weights_only=True))
            log.info("Stream position restored from %s", self._stream_state)
        return loader

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        loader = getattr(self.callback_handler, "train_dataloader", None)
        if self._streaming() and loader is not None:
            import torch

            torch.save(loader.state_dict(), Path(output_dir) / STATE.format(self.args.process_index))


def _state_file(ckpt: Path, args: Any) -> Path:
    """This process's stream state in a checkpoint; the checkpoint must come from a streamed run of as many
    processes (each saved its own part of the stream)."""
    found = sorted(ckpt.glob(STATE.format("*")))
    if not found:
        raise DataError(
            f"{ckpt} holds no stream position (it was not saved by a streamed run); "
            "resume it with data.streaming=false, or start a new run with --overwrite"
        )
    if len(found) != args.world_size:
        raise DataError(
            f"{ckpt} was saved by {len(found)} process(es) reading their own parts of the stream, this run has "
            f"{args.world_size}; resume with {len(found)}"
        )
    return ckpt / STATE.format(args.process_index)
