"""Each task's contract, pinned on two hand-written rows."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from llmkit.config import load_recipe, validate
from llmkit.datafiles import read_conll
from llmkit.errors import DataError
from llmkit.metrics import classification_scores, confusion_counts, load_metric, rouge_scores, seqeval_scores
from llmkit.tasks import get_task
from llmkit.tasks.ner import IGNORE, align_labels, entities, tag_order, to_tags
from llmkit.tasks.summarization import lead_sentence


def _recipe(task, **data):
    raw = {
        "task": task,
        "model": {"name_or_path": "x"},
        "data": {"train": "unused", **data},
        "trainer": {"output_dir": "runs/t"},
    }
    return validate(raw)


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast WordPiece tokenizer, trained here in milliseconds."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(["Peter lives in Berlin", "Maria flew to Lagos", "good film", "bad film"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# ------------------------------------------------------------------ ner


def test_align_labels_first_subtoken_only():
    # [CLS] Wash ##ington is [SEP]  -> words 0, 0, 1
    word_ids = [None, 0, 0, 1, None]
    assert align_labels(word_ids, [1, 0], False, {1: 2}) == [IGNORE, 1, IGNORE, 0, IGNORE]
    # label_all_tokens: the continuation of a B- word gets the I- tag
    assert align_labels(word_ids, [1, 0], True, {1: 2}) == [IGNORE, 1, 2, 0, IGNORE]


def test_ner_preprocess_on_two_rows(tokenizer):
    recipe = _recipe("ner")
    ds = DatasetDict(
        {
            "train": Dataset.from_dict(
                {
                    "tokens": [["Peter", "lives", "in", "Berlin"], ["Maria", "flew"]],
                    "ner_tags": [["B-PER", "O", "O", "B-LOC"], ["B-PER", "O"]],
                }
            )
        }
    )
    task = get_task("ner")
    recipe.options.labels = task.labels(recipe, ds)
    assert recipe.options.labels == ["O", "B-LOC", "B-PER"]
    row = task.preprocess(recipe, ds, tokenizer)["train"][0]
    words = tokenizer(["Peter", "lives", "in", "Berlin"], is_split_into_words=True).word_ids()
    firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
    assert [row["labels"][i] for i in firsts] == [2, 0, 0, 1]
    assert all(row["labels"][i] == IGNORE for i in range(len(words)) if i not in firsts)


def test_ner_classlabel_ids_and_unknown_tags():
    feats = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=["O", "B-X", "I-X"]))})
    ds = DatasetDict({"train": Dataset.from_dict({"tokens": [["a", "b"]], "ner_tags": [[0, 1]]}, features=feats)})
    recipe = _recipe("ner")
    assert get_task("ner").labels(recipe, ds) == ["O", "B-X", "I-X"]
    bad = DatasetDict(
        {
            "train": Dataset.from_dict({"tokens": [["a"]], "ner_tags": [["B-X"]]}),
            "validation": Dataset.from_dict({"tokens": [["a"], ["b"]], "ner_tags": [["B-X"], ["B-Y"]]}),
        }
    )
    with pytest.raises(DataError, match=r"validation split \(.*\), row 2: label 'B-Y' is not in the training data"):
        get_task("ner").labels(_recipe("ner"), bad)


def test_ner_length_mismatch_is_a_data_error(tokenizer):
    recipe = _recipe("ner")
    recipe.options.labels = ["O", "B-PER"]
    ds = DatasetDict({"train": Dataset.from_dict({"tokens": [["a", "b"], ["Peter"]], "ner_tags": [["O"], ["B-PER"]]})})
    with pytest.raises(DataError, match=r"train split \(unused\), row 1: 2 tokens but 1 tags"):
        get_task("ner").preprocess(recipe, ds, tokenizer)
    recipe.data.on_bad_rows = "skip"
    assert len(get_task("ner").preprocess(recipe, ds, tokenizer)["train"]) == 1


def test_tag_order_and_entities():
    assert tag_order({"I-PER", "O", "B-LOC", "B-PER"}) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert entities(["Maria", "Lopez", "visited", "New", "York"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]) == [
        {"type": "PER", "start": 0, "end": 2, "text": "Maria Lopez"},
        {"type": "LOC", "start": 3, "end": 5, "text": "New York"},
    ]


def test_to_tags_skips_ignored_positions():
    names = ["O", "B-PER"]
    preds, refs = to_tags([[1, 1, 0, 0]], [[IGNORE, 1, IGNORE, 0]], names)
    assert preds == [["B-PER", "O"]] and refs == [["B-PER", "O"]]


def test_conll_fixture_parses():
    from conftest import FIXTURES

    rows = read_conll(str(FIXTURES / "ner" / "train.conll"))
    assert len(rows["tokens"]) == 64 and all(
        len(t) == len(g) for t, g in zip(rows["tokens"], rows["ner_tags"], strict=True)
    )


# ------------------------------------------------------------------ classification


def test_classification_string_labels_map_and_save_names(tokenizer):
    recipe = _recipe("classification")
    ds = DatasetDict({"train": Dataset.from_dict({"text": ["good film", "bad film"], "label": ["pos", "neg"]})})
    task = get_task("classification")
    recipe.options.labels = task.labels(recipe, ds)
    assert recipe.options.labels == ["neg", "pos"]
    assert task.model_kwargs(recipe)["id2label"] == {0: "neg", 1: "pos"}
    out = task.preprocess(recipe, ds, tokenizer)["train"]
    assert out["labels"] == [1, 0]
    assert out[0]["input_ids"][0] == tokenizer.cls_token_id


def test_classification_pair_and_multilabel(tokenizer):
    recipe = _recipe("classification", columns={"text_pair": "second"})
    recipe.options.problem_type = "multi_label_classification"
    ds = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"text": ["good film", "bad"], "second": ["bad film", "good"], "label": [["a", "b"], ["b"]]}
            )
        }
    )
    task = get_task("classification")
    recipe.options.labels = task.labels(recipe, ds)
    out = task.preprocess(recipe, ds, tokenizer)["train"]
    assert out["labels"] == [[1.0, 1.0], [0.0, 1.0]]
    assert out[0]["input_ids"].count(tokenizer.sep_token_id) == 2  # the pair is encoded together


def test_classification_label_problems():
    task = get_task("classification")
    mixed = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}),
            "validation": Dataset.from_dict({"text": ["c"], "label": ["z"]}),
        }
    )
    with pytest.raises(DataError, match=r"validation split \(.*\), row 1: label 'z' is not in the training data"):
        task.labels(_recipe("classification"), mixed)
    unlabelled = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
            "test": Dataset.from_dict({"text": ["c"], "label": [-1]}),
        }
    )
    with pytest.raises(DataError, match="unlabelled rows"):
        task.labels(_recipe("classification"), unlabelled)
    with pytest.raises(DataError, match="no column 'label'"):
        task.labels(_recipe("classification"), DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}))


# ------------------------------------------------------------------ summarization


def test_summarization_multi_reference_and_bad_rows(tokenizer):
    recipe = _recipe("summarization", columns={"references": "refs"})
    recipe.options.source_prefix = "summarize: "
    ds = DatasetDict(
        {
            "validation": Dataset.from_dict(
                {
                    "document": ["Peter lives in Berlin.", "   "],
                    "summary": ["Peter lives.", "x"],
                    "refs": [["a", "b"], ["c"]],
                }
            )
        }
    )
    task = get_task("summarization")
    with pytest.raises(DataError, match="row 2: empty document"):
        task.preprocess(recipe, ds, tokenizer)
    recipe.data.on_bad_rows = "skip"
    out = task.preprocess(recipe, ds, tokenizer)["validation"]
    assert len(out) == 1 and out[0]["references"] == ["a", "b"]
    assert out[0]["labels"] == tokenizer(text_target="Peter lives.")["input_ids"]


def test_summarization_tokenizer_corpus_is_the_documents_then_the_summaries():
    recipe = _recipe("summarization", columns={"document": "doc"})
    rows = 2500  # across 1,000-row batches
    ds = Dataset.from_dict(
        {"doc": [f"d{i}" for i in range(rows)], "summary": [None if i == 3 else f"s{i}" for i in range(rows)]}
    )
    corpus = list(get_task("summarization").corpus(recipe, ds))
    assert corpus == [f"d{i}" for i in range(rows)] + [f"s{i}" for i in range(rows) if i != 3]


def test_lead_sentence():
    assert lead_sentence("We study X. Then we show Y.") == "We study X."


# ------------------------------------------------------------------ metrics


def test_classification_metrics_on_toy_predictions():
    s = classification_scores([1, 0, 1, 1], [1, 0, 0, 1])
    assert s["accuracy"] == 0.75 and s["f1_micro"] == 0.75
    assert s["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    module = load_metric("accuracy_f1")
    assert module.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == s


def test_builtin_metrics_import_evaluate_only_for_its_api():
    # evaluate (with scipy) is ~0.3 s that a run would pay before its first step, or at its first evaluation
    import subprocess
    import sys

    code = (
        "import sys\nfrom llmkit.metrics import load_metric\n"
        "m = {n: load_metric(n) for n in ('accuracy_f1', 'multilabel_accuracy_f1', 'seqeval', 'rouge')}\n"
        "assert 'evaluate' not in sys.modules\n"
        "assert m['seqeval'].compute(predictions=[['B-PER', 'O']], references=[['B-PER', 'O']])['f1'] == 1.0\n"
        "assert m['accuracy_f1'].compute(predictions=[1, 0], references=[1, 1])['accuracy'] == 0.5\n"
        "assert 'evaluate' not in sys.modules\n"
        "assert m['rouge'].info.features is not None and 'evaluate' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("name", "predictions", "references"),
    [
        ("accuracy_f1", [1, 0, 2, 2], [1, 1, 2, 0]),
        ("multilabel_accuracy_f1", [[1, 0], [0, 1], [1, 1]], [[1, 0], [1, 1], [0, 1]]),
        ("seqeval", [["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]]),
        ("rouge", ["the cat sat", "a dog"], [["the cat sat down"], ["dogs bark", "a dog barks"]]),
    ],
)
def test_builtin_metric_compute_is_the_evaluate_modules(name, predictions, references):
    from llmkit.metrics import LocalMetric, _module

    direct = LocalMetric(name).compute(predictions=predictions, references=references)
    assert direct == _module(name).compute(predictions=predictions, references=references)


def test_seqeval_metrics_on_toy_predictions():
    refs = [["B-PER", "I-PER", "O", "B-LOC"]]
    preds = [["B-PER", "I-PER", "O", "O"]]
    s = seqeval_scores(preds, refs)
    assert s["precision"] == 1.0 and s["recall"] == 0.5 and s["f1"] == pytest.approx(2 / 3)
    assert s["PER_f1"] == 1.0 and s["LOC_f1"] == 0.0 and s["token_accuracy"] == 0.75


def test_rouge_on_toy_predictions_takes_best_reference():
    assert rouge_scores(["the cat sat"], [["the cat sat"]])["rouge1"] == pytest.approx(100)
    one = rouge_scores(["the cat sat"], [["a dog ran"]])["rouge1"]
    best = rouge_scores(["the cat sat"], [["a dog ran", "the cat sat"]])["rouge1"]
    assert one < best == pytest.approx(100)


def test_unknown_extra_metric_is_a_clear_error_offline():
    from llmkit.errors import RecipeError

    with pytest.raises(RecipeError, match="metrics: cannot load 'accuracy'"):
        load_metric("accuracy")


def test_recipe_metrics_list_fails_at_resolve(tmp_path):
    from conftest import RECIPES

    from llmkit.config import resolve
    from llmkit.errors import RecipeError

    with pytest.raises(RecipeError, match="metrics: cannot load 'bleu'"):
        resolve(load_recipe(RECIPES / "tiny/classification.yaml", ["metrics=[bleu]"]))


def test_classification_reduce_keeps_decisions_not_logits(tmp_path, monkeypatch):
    import json

    import torch

    monkeypatch.chdir(tmp_path)  # the recipe's output_dir, runs/t, gets the confusion matrix
    recipe = _recipe("classification")
    recipe.options.labels = ["a", "b", "c"]
    compute, reduce = get_task("classification").metrics(recipe, None, None)
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    reduced = reduce(logits, None)
    assert reduced.tolist() == [1, 0]

    class P:
        predictions = np.array([1, 0])
        label_ids = np.array([1, 1])

    assert compute(P())["accuracy"] == 0.5
    saved = json.loads((tmp_path / "runs/t/confusion_matrix.json").read_text())
    # Row: the true label, column: the predicted one.
    assert saved == {"labels": ["a", "b", "c"], "matrix": [[0, 0, 0], [1, 1, 0], [0, 0, 0]]}


def test_summarization_collator_never_targets_the_decoder_start_token(tokenizer):
    """bert2bert: the decoder starts from [CLS]; a [CLS]-first target would teach it to repeat [CLS]."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(decoder_start_token_id=tokenizer.cls_token_id))
    collate = get_task("summarization").collator(_recipe("summarization"), tokenizer, model)
    target = tokenizer(text_target="Peter lives")["input_ids"]
    assert target[0] == tokenizer.cls_token_id
    batch = collate([{"input_ids": [5, 6], "labels": target}, {"input_ids": [7], "labels": [9, 10]}])
    assert batch["labels"][0].tolist() == target[1:]
    assert batch["labels"][1].tolist()[:2] == [9, 10]


# ------------------------------------------------------------------ mlm


def _mlm_recipe(seed=42, **model):
    from llmkit.config import resolve

    raw = {
        "task": "mlm",
        "model": {"config": {"model_type": "bert"}, **model},
        "data": {"train": "unused", "max_length": 16},
        "trainer": {"output_dir": "runs/t", "seed": seed, "report_to": "none"},
    }
    return resolve(validate(raw))


def test_mlm_masks_depend_on_the_batch_not_on_call_order(tokenizer):
    collate = get_task("mlm").collator(_mlm_recipe(), tokenizer, None)
    rows = [{"input_ids": list(range(5, 45))}, {"input_ids": list(range(6, 46))}]
    other = [rows[1], {"input_ids": list(range(7, 47))}]
    first = collate(rows)
    collate(other)  # a prefetched batch in between must not change the next masks
    again = collate(rows)
    assert (first["labels"] != IGNORE).any()
    assert first["labels"].tolist() == again["labels"].tolist()
    assert first["input_ids"].tolist() == again["input_ids"].tolist()
    assert collate(other)["labels"][0].tolist() != first["labels"][1].tolist()  # new neighbours, new masks
    reseeded = get_task("mlm").collator(_mlm_recipe(seed=7), tokenizer, None)(rows)
    assert reseeded["labels"].tolist() != first["labels"].tolist()


def test_mlm_evaluation_rows_are_masked_once(tokenizer):
    recipe = _mlm_recipe()
    text = ["Peter lives in Berlin and Maria flew to Lagos"] * 8
    ds = DatasetDict({"train": Dataset.from_dict({"text": text}), "validation": Dataset.from_dict({"text": text})})
    out = get_task("mlm").preprocess(recipe, ds, tokenizer)
    assert "labels" not in out["train"].column_names
    val = out["validation"]
    assert set(val.column_names) == {"input_ids", "labels"}
    masked = [(i, lab) for row in val for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
    assert masked and any(i == tokenizer.mask_token_id for i, _ in masked)
    batch = get_task("mlm").collator(recipe, tokenizer, None)(list(val))
    assert batch["labels"].tolist() == val["labels"] and batch["input_ids"].tolist() == val["input_ids"]


def test_mlm_head_on_masked_positions_only_gives_the_same_loss_and_gradients():
    import copy

    import torch
    from transformers import BertConfig, BertForMaskedLM

    from llmkit.tasks.mlm import predict_masked_positions_only

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    plain = BertForMaskedLM(cfg).eval()
    fast = predict_masked_positions_only(copy.deepcopy(plain))
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 2], labels[1, 5], labels[1, 7], labels[2, 11] = 7, 9, 11, 13
    a, b = plain(input_ids=ids, labels=labels), fast(input_ids=ids, labels=labels)
    assert b.logits.shape == (4, 50)  # only the masked positions reached the vocabulary head
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert fast(input_ids=ids).logits.shape == (3, 12, 50)  # inference (no labels) is untouched


@pytest.mark.parametrize("skip", [True, False])
def test_mlm_head_at_masked_positions_only_unless_skip_positions_is_off(skip):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = BertForMaskedLM(cfg)
    get_task("mlm").prepare_model(_mlm_recipe(skip_positions=skip), model)
    ids = torch.randint(5, 50, (2, 8))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 1], labels[1, 4] = 7, 9
    assert model(input_ids=ids, labels=labels).logits.shape == ((2, 50) if skip else (2, 8, 50))


def test_mlm_speed_up_stays_off_where_it_cannot_work(tokenizer):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.sparse_prediction = True  # a model that already predicts only at masked positions (ModernBERT's flag)
    model = BertForMaskedLM(cfg)
    get_task("mlm").prepare_model(_mlm_recipe(), model)
    ids = torch.randint(5, 50, (2, 8))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 1] = 7
    assert model(input_ids=ids, labels=labels).logits.shape == (2, 8, 50)  # hooks not installed


def test_trainer_learns_which_losses_take_the_token_count():
    import torch
    import transformers

    from llmkit.modeling import declare_loss_kwargs

    tiny = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    cases = [
        ("BertForMaskedLM", transformers.BertConfig(**tiny), False),  # its own mean CrossEntropyLoss
        ("BertForTokenClassification", transformers.BertConfig(**tiny), False),
        ("LlamaForSequenceClassification", transformers.LlamaConfig(**tiny), False),  # loss_function without **kwargs
        ("LlamaForCausalLM", transformers.LlamaConfig(**tiny), True),  # loss_function(..., **kwargs)
    ]
    for name, config, expected in cases:
        with torch.device("meta"):
            model = getattr(transformers, name)(config)
        declare_loss_kwargs(model)
        assert model.accepts_loss_kwargs is expected, name


def test_save_errors_from_any_writer_are_one_line_with_the_fix(tmp_path):
    from llmkit.checkpoints import is_save_error, save_failed

    full = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0: No space left on device")
    assert is_save_error(full) and not is_save_error(RuntimeError("shape mismatch"))
    message = str(save_failed("checkpoint checkpoint-6", tmp_path, full))
    assert "\n" not in message and "free space on the disk holding" in message and "--resume" in message


def test_ner_trains_on_random_batches_and_classification_on_length_grouped_ones(tmp_path):
    # Grouping cost NER 2.9 test F1 points on WNUT-17 over 6 seeds (README, NER accuracy); a recipe can still name it.
    from conftest import RECIPES

    from llmkit.config import resolve

    def strategy(name: str, *overrides: str) -> str:
        recipe = load_recipe(RECIPES / "tiny" / name, [f"trainer.output_dir={tmp_path / name}", *overrides])
        return str(resolve(recipe).args.train_sampling_strategy)

    assert strategy("ner.yaml") == "random"
    assert strategy("classification.yaml") == "group_by_length"
    assert strategy("ner.yaml", "trainer.train_sampling_strategy=group_by_length") == "group_by_length"


@pytest.mark.parametrize("case", range(40))
def test_classification_scores_agree_with_sklearn(case):
    # computed with numpy (sklearn's import is ~0.4 s of a run's first evaluation); the same numbers as sklearn's
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    rng = np.random.default_rng(case)
    n, k = int(rng.integers(1, 60)), int(rng.integers(1, 7))
    shape = (n, k) if case % 3 == 0 else (n,)  # every third case multi-label indicator rows
    top = 2 if case % 3 == 0 else k
    r, p = rng.integers(0, top, shape), rng.integers(0, top, shape)
    if case % 5 == 1:
        p = r.copy()  # perfect predictions
    s = classification_scores(p.tolist(), r.tolist())
    z = {"zero_division": 0}
    want = {
        "accuracy": accuracy_score(r, p),
        "f1_macro": f1_score(r, p, average="macro", **z),
        "f1_micro": f1_score(r, p, average="micro", **z),
        "precision": precision_score(r, p, average="macro", **z),
        "recall": recall_score(r, p, average="macro", **z),
    }
    assert s == pytest.approx(want, abs=1e-12)
    if p.ndim == 1:
        labels = k + 1  # one label that never occurs
        assert confusion_counts(p.tolist(), r.tolist(), labels) == confusion_matrix(r, p, labels=range(labels)).tolist()


def test_classification_metrics_do_not_import_sklearn():
    import subprocess
    import sys

    code = (
        "import sys\nfrom llmkit.metrics import classification_scores, confusion_counts\n"
        "classification_scores([1, 0], [1, 1]); classification_scores([[1, 0]], [[1, 1]]); confusion_counts([1], [0], 2)\n"
        "assert 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
