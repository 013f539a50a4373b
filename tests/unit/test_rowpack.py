"""NER training batches packed into fewer rows (llmkit/rowpack.py): the same loss and gradients as the padded batch,
only where it holds."""

import copy

import pytest
import torch
from test_cpu_speedups import _classifier

from llmkit import rowpack, unpad


def _tagger(kind: str = "bert", attn: str = "eager"):
    return _classifier(kind, attn, tokens=True)  # 2 layers, no dropout


def _batch(lengths=(9, 3, 4, 2, 6, 5)):
    width = max(lengths)
    ids = torch.randint(5, 60, (len(lengths), width))
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # [CLS]
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels)


def _rows_seen(model):
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    return seen


def test_the_plan_fits_each_row_in_the_width_and_places_every_sentence_once():
    lengths = [9, 3, 4, 2, 6, 5, 9, 1]
    rows = rowpack.plan(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows) and len(rows) == 5


@pytest.mark.parametrize("kind,attn", [("bert", "eager"), ("bert", "sdpa"), ("electra", "eager"), ("electra", "sdpa")])
@pytest.mark.parametrize("skip", [True, False])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_one(kind, attn, skip):
    plain = _tagger(kind, attn)
    packed = copy.deepcopy(plain)
    if skip:  # as `llmkit finetune` runs NER: padding skipped and the last layer at the labelled positions too
        assert unpad.skip_padding(packed, labelled_last_layer=True)
    assert rowpack.pack_rows(packed)
    seen = _rows_seen(packed)
    batch = _batch()
    for model in (plain, packed):
        model.train()
        model(**batch).loss.backward()
    assert seen == [4]  # 6 sentences in 4 rows of 9: [9], [6, 3], [5, 4], [2]
    a, b = plain(**batch).loss, packed(**batch).loss
    torch.testing.assert_close(a, b)
    for (name, p), q in zip(plain.named_parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_packing_is_left_alone_where_it_would_not_hold_or_pay():
    model = _tagger()
    assert rowpack.pack_rows(model)
    seen = _rows_seen(model)
    batch = _batch()
    model.eval()  # evaluation and prediction: logits per sentence row, unpacked
    model(**batch)
    model.train()
    model(**{k: v for k, v in batch.items() if k != "labels"})  # no labels
    left = {k: v.flip(1) for k, v in batch.items()}  # left padding
    model(**left)
    model(**_batch(lengths=(5, 5, 5)))  # nothing to gain: no row has room for another sentence
    model(**batch, position_ids=torch.arange(9).expand(6, -1))  # position ids of the caller's own
    assert seen == [6, 6, 6, 3, 6]
    assert not rowpack.pack_rows(_tagger("roberta"))  # positions start after the padding index
    assert not rowpack.pack_rows(_tagger("bert", "flex_attention"))


def test_ner_packs_its_training_batches_but_not_with_a_teacher():
    from types import SimpleNamespace

    from llmkit.tasks import ner

    def recipe(distill):
        return SimpleNamespace(model=SimpleNamespace(skip_positions=None), distill=distill, args=None)

    for distill, rows in [(None, [4]), (SimpleNamespace(hidden_loss=0.0), [6])]:
        model = _tagger()
        ner.TASK.prepare_model(recipe(distill), model)
        seen = _rows_seen(model)
        model.train()
        model(**_batch())
        assert seen == rows
