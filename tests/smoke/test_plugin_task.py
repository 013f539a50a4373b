"""A new task is one module: a toy regression task, installed as a plugin (the `llmkit.tasks` entry point),
is validated, preflighted, trained and evaluated end to end with its own model-building and loss hooks."""

import json
import random
import sys
import textwrap

import pytest

from llmkit import engine, preflight, tasks
from llmkit.config import load_recipe, resolve
from llmkit.errors import RecipeError

pytestmark = pytest.mark.smoke

TOY = '''
"""A toy task: predict a text's share of vowels (a number) from the text."""

from dataclasses import dataclass

from llmkit.rows import TEXT, tokenize_splits
from llmkit.tasks.base import Role, Task

CALLS = {"build": 0, "loss": 0}


@dataclass
class Options:
    scale: float = 1.0  # multiplies the target


def _preprocess(recipe, ds, tokenizer):
    text, score = TASK.column(recipe, "text"), TASK.column(recipe, "score")

    def encode(batch):
        enc = tokenizer(batch[text], truncation=True, max_length=recipe.data.max_length)
        enc["labels"] = [float(v) * recipe.options.scale for v in batch[score]]
        return enc

    return tokenize_splits(recipe, ds, encode, TASK.checked_columns(recipe))


def _build(recipe, tokenizer, kwargs, default):
    CALLS["build"] += 1
    model = default(recipe, tokenizer, {**kwargs, "num_labels": 1, "problem_type": "regression"})
    model.get_input_embeddings().weight.requires_grad_(False)  # the hook changes what the default built
    return model


def _loss(model, inputs, num_items_in_batch):
    import torch

    CALLS["loss"] += 1
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    loss = torch.nn.functional.l1_loss(outputs.logits.squeeze(-1).float(), inputs["labels"].float())
    return loss, outputs


def _metrics(recipe, tokenizer, eval_ds):
    import numpy as np

    def compute(p):
        return {"mae": float(np.abs(p.predictions.reshape(-1) - p.label_ids.reshape(-1)).mean())}

    return compute, None


TASK = Task(
    name="toy",
    stage="finetune",
    recipe="toy.yaml",
    description="toy regression: the share of vowels in a text",
    auto_model="AutoModelForSequenceClassification",
    peft_task_type="SEQ_CLS",
    Options=Options,
    roles={"text": Role(TEXT, "text"), "score": Role("number", "score")},
    preprocess=_preprocess,
    collator=lambda recipe, tokenizer, model: __import__("transformers").DataCollatorWithPadding(tokenizer),
    corpus=lambda recipe, train: iter(train[TASK.column(recipe, "text")]),
    metrics=_metrics,
    build_model=_build,
    compute_loss=_loss,
    main_metric="eval_mae",
    tokens_per_sample=False,
)
'''


def _rows(n, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "rhythm", "queue", "sky", "audio", "crypt", "idea", "lynx", "oboe"]
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        letters = text.replace(" ", "")
        rows.append({"text": text, "score": sum(c in "aeiou" for c in letters) / len(letters)})
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """The toy module and a dist-info declaring it under the llmkit.tasks entry point, on sys.path."""
    site = tmp_path / "site"
    (site / "toytask-0.1.dist-info").mkdir(parents=True)
    (site / "toytask.py").write_text(textwrap.dedent(TOY))
    (site / "toytask-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toytask\nVersion: 0.1\n")
    (site / "toytask-0.1.dist-info" / "entry_points.txt").write_text("[llmkit.tasks]\ntoy = toytask:TASK\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(tasks, "TASKS", {})  # discovered afresh, with the plugin
    yield
    sys.modules.pop("toytask", None)


def _recipe_file(tmp_path, *extra):
    (tmp_path / "train.jsonl").write_text(_rows(48, 0))
    (tmp_path / "validation.jsonl").write_text(_rows(16, 1))
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            task: toy
            model:
              config: {{model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}
            tokenizer:
              train: {{type: wordpiece, vocab_size: 120, lowercase: true}}
            data: {{train: {tmp_path / "train.jsonl"}, validation: {tmp_path / "validation.jsonl"}, max_length: 16}}
            options: {{scale: 1.0}}
            trainer:
              output_dir: {tmp_path / "run"}
              num_train_epochs: 2
              per_device_train_batch_size: 8
              learning_rate: 1.0e-3
              eval_strategy: epoch
              logging_steps: 2
              report_to: none
            """
        )
        + "".join(f"{line}\n" for line in extra)
    )
    return recipe


@pytest.mark.usefixtures("toy_plugin")
def test_a_plugin_task_runs_end_to_end(tmp_path):
    import toytask

    assert "toy" in tasks.all_tasks() and {"mlm", "ner"} <= set(tasks.all_tasks())  # beside the built-in ones
    with pytest.raises(RecipeError, match=r"unknown key 'options.scal' \(did you mean 'scale'\?\)"):
        load_recipe(_recipe_file(tmp_path, "options: {scal: 2.0}"))

    recipe = resolve(load_recipe(_recipe_file(tmp_path)))
    task = tasks.get_task("toy")
    raw, tokenizer = preflight.load_data(recipe, task)
    report = preflight.build_report(recipe, task, raw, tokenizer)
    assert report["task"] == "toy" and report["splits"]["train"]["rows"] == 48
    assert report["splits"]["validation"]["bad_rows"] == 0

    summary = engine.train(recipe)
    assert toytask.CALLS["build"] == 1 and toytask.CALLS["loss"] >= summary["steps"] == 12
    assert summary["trainable_parameters"] < summary["parameters"]  # the build hook froze the embeddings
    assert 0 <= summary["final_metrics"]["eval_mae"] < 1
    # The hook's L1 loss is what the Trainer evaluated: mean |prediction - target|, the metric itself.
    assert summary["final_metrics"]["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_mae"], rel=1e-4)
    assert json.loads((tmp_path / "run" / "preflight.json").read_text())["task"] == "toy"

    from llmkit.rundir import recipe_for_evaluation

    metrics = engine.evaluate(recipe_for_evaluation(tmp_path / "run", []), "validation")
    assert metrics["eval_mae"] == pytest.approx(summary["final_metrics"]["eval_mae"], rel=1e-4)
    assert toytask.CALLS["build"] == 2  # evaluate built the model through the hook too
