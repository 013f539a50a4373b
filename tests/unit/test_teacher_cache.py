"""The teacher's logits kept per example (llmkit/teacher_cache.py): found by content whatever the padding, order
or batch; rebuilt exactly; never kept for vocabulary-wide outputs; saved and loaded with a checkpoint."""

import types

import torch

from llmkit import teacher_cache
from llmkit.teacher_cache import TeacherCache, teacher_logits


def _batch(rows, labels=None, pad_to=None):
    """input_ids / attention_mask (and labels) for token rows, right-padded to `pad_to`."""
    width = pad_to or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab = torch.full((len(rows), width), -100)
        for i, r in enumerate(labels):
            lab[i, : len(r)] = torch.tensor(r)
        out["labels"] = lab
    return out


class Teacher(torch.nn.Module):
    """Logits from the tokens alone (per position, or per sequence), counting its forwards."""

    def __init__(self, classes=3, per_token=True):
        super().__init__()
        self.classes, self.per_token, self.calls = classes, per_token, 0

    def forward(self, input_ids, attention_mask, labels=None):
        self.calls += 1
        logits = torch.sin(input_ids[..., None].float() * torch.arange(1, self.classes + 1))
        logits = logits * attention_mask[..., None]
        return types.SimpleNamespace(logits=logits if self.per_token else logits.sum(1))


def test_same_example_same_key_whatever_the_padding_and_batch():
    cache = TeacherCache()
    a = cache.keys(_batch([[5, 6, 7], [8, 9]]))
    b = cache.keys(_batch([[8, 9], [1], [5, 6, 7]], pad_to=6))
    assert a[0] == b[2] and a[1] == b[0] and len(set(a + b)) == 3
    # the same tokens with other labelled positions are another example (NER: which logits are read)
    c = cache.keys(_batch([[5, 6, 7]], labels=[[1, -100, 2]]))[0]
    d = cache.keys(_batch([[5, 6, 7]], labels=[[1, 2, -100]]))[0]
    assert len({a[0], c, d}) == 3


def test_a_second_epoch_reads_the_kept_logits_instead_of_running_the_teacher():
    for per_token in (True, False):
        cache, teacher = TeacherCache(), Teacher(per_token=per_token)
        first = _batch([[5, 6, 7], [8, 9]])
        logits, taught = teacher_logits(cache, teacher, first)
        assert teacher.calls == 1 and taught is not None
        again = _batch([[8, 9], [5, 6, 7]], pad_to=5)  # shuffled, padded otherwise
        kept, taught = teacher_logits(cache, teacher, again)
        assert teacher.calls == 1 and taught is None and (cache.hits, cache.misses) == (1, 1)
        fresh = teacher(**again).logits
        if per_token:  # real positions equal, padding zero
            assert torch.equal(kept, fresh * again["attention_mask"][..., None])
        else:
            assert torch.equal(kept, fresh)
        partly = _batch([[8, 9], [4]])  # one example not seen yet: the teacher runs
        teacher_logits(cache, teacher, partly)
        assert teacher.calls == 3  # (the line above called it once more itself)


def test_vocabulary_wide_outputs_and_a_full_cache_are_not_kept():
    wide = Teacher(classes=teacher_cache.MAX_CLASSES + 1)
    cache = TeacherCache()
    teacher_logits(cache, wide, _batch([[5, 6]]))
    teacher_logits(cache, wide, _batch([[5, 6]]))
    assert cache.rows == {} and cache.off and wide.calls == 2 and cache.misses == 1  # no key looked up again
    small = TeacherCache(limit_bytes=1)
    teacher_logits(small, Teacher(), _batch([[5, 6]]))
    teacher_logits(small, Teacher(), _batch([[7, 8]]))
    assert len(small.rows) == 1  # full after the first


def test_saved_with_a_checkpoint_and_merged_on_load(tmp_path):
    one, two = TeacherCache(), TeacherCache()
    teacher_logits(one, Teacher(), _batch([[5, 6]]))
    teacher_logits(two, Teacher(), _batch([[7, 8, 9]]))
    one.save(tmp_path, 0)
    two.save(tmp_path, 1)
    back = TeacherCache()
    back.load(tmp_path)  # the processes' caches together: keys are contents
    assert back.rows.keys() == one.rows.keys() | two.rows.keys()
    for key, row in {**one.rows, **two.rows}.items():
        assert torch.equal(back.rows[key], row)


def test_kept_only_where_inputs_repeat_and_no_hidden_states_are_needed():
    def recipe(**d):
        return types.SimpleNamespace(
            distill=types.SimpleNamespace(**{"alpha": 0.5, "hidden_loss": 0, "cache": True, **d})
        )

    fixed, masked = types.SimpleNamespace(random_inputs=False), types.SimpleNamespace(random_inputs=True)
    labels = torch.nn.Linear(4, 3)  # a classification head: no output embeddings
    words = types.SimpleNamespace(get_output_embeddings=lambda: torch.nn.Linear(4, 50000))  # an LM head
    assert teacher_cache.wanted(recipe(), fixed, labels)
    assert not teacher_cache.wanted(recipe(), fixed, words)  # clm, summarization: a vocabulary per position
    assert not teacher_cache.wanted(recipe(), masked, labels)  # MLM: new masks every time
    assert not teacher_cache.wanted(recipe(hidden_loss=1.0), fixed, labels)
    assert not teacher_cache.wanted(recipe(alpha=0), fixed, labels)  # no teacher at all
    assert not teacher_cache.wanted(recipe(cache=False), fixed, labels)
