"""Length-grouped training batches that stay random (`train_sampling_strategy: group_by_length`).

transformers' LengthGroupedSampler cuts each epoch's random order into mega-batches of up to 50 batches, sorts
each by length and serves its batches in that order: longest first, then ever shorter, mega-batch after
mega-batch. The padding saved is large (1.7-1.9x faster fine-tuning here), but consecutive steps then see a
length curriculum that repeats every mega-batch. llmkit keeps the same mega-batches, so the same batches and
padding, and serves the batches of the whole epoch in a random order (the longest first, so a too-large batch
fails at once; a last, smaller batch last, so every other batch stays whole).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Sampler


class ShuffledLengthGroups(Sampler):
    def __init__(self, lengths: list[int], batch_size: int, generator: Any = None) -> None:
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        import torch

        n, size = len(self.lengths), self.batch_size
        groups = max(1, min(n // (size * 4), 50))  # transformers' mega-batch size
        order = torch.randperm(n, generator=self.generator).tolist()
        batches = []
        for start in range(0, n, size * groups):
            chunk = sorted(order[start : start + size * groups], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        last = [batches.pop()] if len(batches[-1]) < size else []
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]]) if batches else 0
        first = [batches.pop(longest)] if batches else []
        rest = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        return iter([i for batch in first + rest + last for i in batch])


class GroupsLengthsRandomly:
    """Trainer mixin: `group_by_length` batches served in a random order (ShuffledLengthGroups)."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        if isinstance(sampler, LengthGroupedSampler):
            return ShuffledLengthGroups(sampler.lengths, sampler.batch_size, sampler.generator)
        return sampler
