"""The tiny fine-tuning recipes end to end: finetune, then evaluate, then predict (offline, seconds)."""

import json
import math

import pytest
from conftest import FIXTURES, RECIPES, ROOT

from llmkit import engine, rundir
from llmkit import predict as predicting
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError

pytestmark = pytest.mark.smoke


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tiny recipes name their fixtures relative to the repository root


def _train(name, out, *overrides):
    recipe = resolve(load_recipe(RECIPES / "tiny" / f"{name}.yaml", [f"trainer.output_dir={out}", *overrides]))
    return engine.train(recipe)


def test_classification_finetune_evaluate_predict(tmp_path):
    import transformers

    out = tmp_path / "cls"
    summary = _train("classification", out, "trainer.num_train_epochs=6")
    metrics = summary["final_metrics"]
    assert {"eval_accuracy", "eval_f1_macro", "eval_f1_micro", "eval_precision", "eval_recall"} <= set(metrics)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "negative", 1: "positive"}  # string labels saved as names

    # What the run leaves for people: the summary, plots (with a confusion matrix) and a Hugging Face model card.
    saved = json.loads((out / "summary.json").read_text())
    assert saved["task"] == "classification" and saved["steps"] == summary["steps"] > 0
    assert saved["final_metrics"] == json.loads((out / "eval_validation.json").read_text()) == metrics
    assert {p.name for p in (out / "plots").iterdir()} == {
        "loss.png",
        "learning_rate.png",
        "accuracy.png",
        "confusion_matrix.png",
    }
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    assert confusion["labels"] == ["negative", "positive"]
    assert sum(map(sum, confusion["matrix"])) == 24  # every validation row, once
    assert sum(confusion["matrix"][i][i] for i in range(2)) / 24 == pytest.approx(metrics["eval_accuracy"])
    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: llmkit" in header and "pipeline_tag: text-classification" in header
    assert "- train.jsonl" in header and "- accuracy" in header
    assert f"| accuracy | {metrics['eval_accuracy']:.4f} |" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card and "task: classification" in card
    from llmkit.report import report

    drawn = report([out, out], tmp_path / "compare")
    assert sorted(p.name for p in drawn) == ["accuracy.png", "learning_rate.png", "loss.png"]
    import matplotlib.image

    loss = (matplotlib.image.imread(tmp_path / "compare" / "loss.png")[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in loss.reshape(-1, 3)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # the two overlaid runs, one colour each
    (out / "plots" / "confusion_matrix.png").unlink()
    assert "confusion_matrix.png" in [p.name for p in report([out])]  # `llmkit report RUN` redraws it

    test = engine.evaluate(rundir.recipe_for_evaluation(out, []), "test")
    assert test["samples"] == 24 and 0 <= test["eval_accuracy"] <= 1
    assert json.loads((out / "eval_test.json").read_text())["eval_accuracy"] == test["eval_accuracy"]
    assert json.loads((out / "confusion_matrix.json").read_text()) == confusion  # still the validation one

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a wonderful film overall"}\n{"text": "a dull script"}\n')
    n = predicting.predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "preds.jsonl")
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert n == 2 and [p["text"] for p in preds] == ["a wonderful film overall", "a dull script"]
    # The label and score are the saved model's own argmax and softmax, as transformers computes them.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    import torch

    with torch.no_grad():
        probs = model(**tokenizer([p["text"] for p in preds], padding=True, return_tensors="pt")).logits.softmax(-1)
    for p, row in zip(preds, probs, strict=True):
        assert p["label"] == model.config.id2label[int(row.argmax())]
        assert p["score"] == pytest.approx(float(row.max()), abs=1e-4)
    with pytest.raises(LlmkitError, match="exists; pass --overwrite"):
        predicting.predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "preds.jsonl")


def test_ner_finetune_evaluate_predict(tmp_path):
    out = tmp_path / "ner"
    summary = _train("ner", out)
    metrics = summary["final_metrics"]
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_token_accuracy", "eval_PER_f1", "eval_LOC_f1"} <= set(
        metrics
    )
    test = engine.evaluate(rundir.recipe_for_evaluation(out, []), "test")
    assert math.isfinite(test["eval_loss"]) and 0 <= test["eval_f1"] <= 1

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"tokens": ["Alice", "flew", "to", "Paris", "."]}\n{"text": "Bob lives in Tokyo"}\n')
    predicting.predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "preds.jsonl")
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [len(p["tags"]) for p in preds] == [5, 4]  # one tag per word, whatever the sub-tokens
    assert all(t in ("O", "B-PER", "I-PER", "B-LOC", "I-LOC") for p in preds for t in p["tags"])
    assert all({"type", "start", "end", "text"} == set(e) for p in preds for e in p["entities"])


@pytest.mark.parametrize("fast", [True, False])
def test_cpu_training_uses_the_fast_dropout_unless_turned_off(tmp_path, fast):
    from transformers import TrainerCallback

    from llmkit.fastdropout import FastDropout

    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["layers"] = any(isinstance(m, FastDropout) for m in model.modules())
            seen["attention modules"] = sum(hasattr(m, "_llmkit_fast_dropout") for m in model.modules())
            seen["attention"] = model.config._attn_implementation

    overrides = [f"trainer.output_dir={tmp_path}", "trainer.max_steps=1", f"model.fast_dropout={str(fast).lower()}"]
    engine.train(resolve(load_recipe(RECIPES / "tiny" / "ner.yaml", overrides)), callbacks=[Look()])
    # the tiny BERT drops attention probabilities and the recipe names no attention: eager replaces SDPA
    expected = {"layers": True, "attention modules": 1, "attention": "eager"} if fast else {
        "layers": False, "attention modules": 0, "attention": "sdpa"}  # fmt: skip
    assert seen == expected


def test_summarization_finetune_evaluate_predict(tmp_path):
    out = tmp_path / "sum"
    summary = _train("summarization", out)
    metrics = summary["final_metrics"]
    assert rundir.foreign_entries(out) == []  # --overwrite recognises everything a run writes
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_gen_len"} <= set(metrics)
    assert 0 <= metrics["eval_rouge1"] <= 100 and metrics["eval_gen_len"] <= 16
    test = engine.evaluate(rundir.recipe_for_evaluation(out, []), "test")
    assert test["samples"] == 12 and math.isfinite(test["eval_loss"])
    inputs = tmp_path / "in.txt"
    inputs.write_text("Officials said that the new bridge opened on Monday. Residents welcomed the news.\n")
    predicting.predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "preds.jsonl")
    (pred,) = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    # The summary is what the saved model generates with its saved generation settings.
    import transformers

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    enc = tokenizer([inputs.read_text().strip()], return_tensors="pt")
    enc.pop("token_type_ids", None)
    ids = model.generate(**enc, generation_config=model.generation_config)
    assert pred["summary"] == tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_finetune_what_pretrain_made(tmp_path):
    """`llmkit finetune recipes/ner.yaml model.name_or_path=runs/bert`: a new head on the pretrained body."""
    import torch
    import transformers

    bert = tmp_path / "bert"
    engine.train(resolve(load_recipe(RECIPES / "tiny/bert.yaml", [f"trainer.output_dir={bert}"])))
    out = tmp_path / "ner"
    _train(
        "ner",
        out,
        f"model.name_or_path={bert}",
        "model.config=null",
        "tokenizer.train=null",
        "trainer.num_train_epochs=1",
    )
    base = transformers.AutoModelForMaskedLM.from_pretrained(bert)
    tuned = transformers.AutoModelForTokenClassification.from_pretrained(out)
    assert tuned.config.vocab_size == base.config.vocab_size
    assert tuned.config.num_labels == 5
    assert not torch.equal(base.bert.embeddings.word_embeddings.weight, tuned.bert.embeddings.word_embeddings.weight)


def test_bad_data_fails_with_one_clear_line(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"review": "good", "label": "pos"}\n')
    with pytest.raises(LlmkitError, match=r"no column 'text' for text \(columns found: review, label\)"):
        _train("classification", tmp_path / "o", f"data.train={train}")
    with pytest.raises(
        LlmkitError, match=r"validation split \(.*\), row 1: label 'neutral' is not in the training data"
    ):
        val = tmp_path / "val.jsonl"
        val.write_text('{"text": "meh", "label": "neutral"}\n')
        _train("classification", tmp_path / "o", f"data.validation={val}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LlmkitError):
        _train("classification", tmp_path / "o", f"data.train={empty}")
    assert FIXTURES.exists()


def test_launch_time_settings_of_a_run_never_reach_a_single_process_command(tmp_path):
    # A run launched with FSDP/DDP settings saves them in its recipe; evaluate and predict run in one process.
    from llmkit.recipefile import dump_yaml, load_raw

    out = tmp_path / "run"
    _train("classification", out, "trainer.num_train_epochs=1")
    raw = load_raw(out / "recipe.yaml")
    raw["trainer"].update(
        fsdp="full_shard auto_wrap",
        fsdp_config={"transformer_layer_cls_to_wrap": ["BertLayer"]},
        ddp_find_unused_parameters=False,
        ddp_timeout=600,
        local_rank=0,
    )
    (out / "recipe.yaml").write_text(dump_yaml(raw))
    recipe = rundir.recipe_for_evaluation(out, [])
    assert not {"fsdp", "fsdp_config", "ddp_timeout", "ddp_find_unused_parameters", "local_rank"} & set(recipe.trainer)
    metrics = engine.evaluate(recipe)
    assert metrics["samples"] == 24
    (tmp_path / "in.jsonl").write_text('{"text": "a fine film"}\n')
    assert predicting.predict(recipe, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 1
