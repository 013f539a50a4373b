"""Length-grouped batches served in a random order (llmkit/batching.py): the same batches, so the same padding,
as transformers' LengthGroupedSampler, without its long-to-short order inside each mega-batch."""

import random

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from llmkit.batching import ShuffledLengthGroups


def _batches(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_same_batches_and_padding_as_transformers_in_a_random_order():
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(3394)]  # WNUT-17's training rows, lengths like tweets
    ours = list(ShuffledLengthGroups(lengths, 32, torch.Generator().manual_seed(7)))
    theirs = list(LengthGroupedSampler(32, lengths=lengths, generator=torch.Generator().manual_seed(7)))
    assert sorted(ours) == list(range(len(lengths)))  # every row once
    as_sets = lambda idx: sorted(tuple(sorted(b)) for b in _batches(idx, 32))  # noqa: E731
    assert as_sets(ours) == as_sets(theirs)  # the very same batches (same mega-batches, same sort)
    padded = lambda idx: sum(len(b) * max(lengths[i] for i in b) for b in _batches(idx, 32))  # noqa: E731
    assert padded(ours) == padded(theirs)
    assert max(lengths[i] for i in ours[:32]) == max(lengths)  # the longest batch first: too large fails at once
    assert len(_batches(ours, 32)[-1]) == len(lengths) % 32  # the one short batch last
    # transformers serves each mega-batch's batches from longest to shortest; ours are not so ordered
    tops = [max(lengths[i] for i in b) for b in _batches(ours, 32)]
    falls = sum(a >= b for a, b in zip(tops[1:26], tops[2:27], strict=True))
    assert falls < 20, tops[:27]
    theirs_tops = [max(lengths[i] for i in b) for b in _batches(theirs, 32)]
    assert all(a >= b for a, b in zip(theirs_tops[1:25], theirs_tops[2:26], strict=True))  # 26 batches a mega-batch


def test_seeded_orders_repeat_and_differ_between_epochs():
    lengths = list(range(5, 500))
    make = lambda seed: list(ShuffledLengthGroups(lengths, 8, torch.Generator().manual_seed(seed)))  # noqa: E731
    assert make(1) == make(1) and make(1) != make(2)
    sampler = ShuffledLengthGroups(lengths, 8, torch.Generator().manual_seed(1))
    assert list(sampler) != list(sampler)  # a new order each epoch
