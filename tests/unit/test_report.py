"""What a run leaves for people: the model card, the plots, the confusion matrix and the end-of-run table."""

import json

import pytest
import yaml
from conftest import RECIPES

from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError
from llmkit.metrics import confusion_counts, save_confusion
from llmkit.report import model_card, plot_confusion, plot_runs, report
from llmkit.tasks import get_task

SUMMARY = {
    "task": "classification",
    "model": "distilbert/distilbert-base-uncased",
    "parameters": 66_955_010,
    "trainable_parameters": 66_955_010,
    "steps": 420,
    "epochs": 2.0,
    "world_size": 1,
    "global_batch_size": 32,
    "bf16": True,
    "wall_time_s": 600.4,
    "train_runtime_s": 590.0,
    "train_samples_per_second": 22.8,
    "train_tokens_per_second": None,
    "train_loss": 0.31,
    "final_metrics": {
        "eval_loss": 0.25,
        "eval_accuracy": 0.91,
        "eval_f1_macro": 0.905,
        "eval_runtime": 3.2,
        "eval_samples_per_second": 272.5,
        "epoch": 2.0,
    },
    "evaluations": [{"step": 210, "eval_loss": 0.3}, {"step": 420, "eval_loss": 0.25}],
    "output_dir": "runs/sst2",
    "llmkit_version": "0.1.0",
}


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ------------------------------------------------------------------ model card


def test_model_card_header_names_base_model_task_data_and_metrics():
    recipe = load_recipe(RECIPES / "classification.yaml")
    card = model_card(recipe, get_task("classification"), SUMMARY)
    assert _header(card) == {
        "library_name": "llmkit",
        "pipeline_tag": "text-classification",
        "tags": ["llmkit", "classification"],
        "base_model": "distilbert/distilbert-base-uncased",
        "datasets": ["stanfordnlp/sst2"],
        "metrics": ["accuracy", "f1_macro", "loss"],  # timings and epoch are not metrics
    }
    assert "# sst2" in card
    assert "| accuracy | 0.9100 |" in card and "| f1_macro | 0.9050 |" in card and "runtime" not in card
    assert "- model: distilbert/distilbert-base-uncased; 66,955,010 parameters, 66,955,010 trained" in card
    assert "- 420 steps, 2.00 epochs, global batch 32, 1 process(es), bf16" in card
    assert "- wall time 600 s, 22.8 samples/s" in card
    assert 'AutoModelForSequenceClassification.from_pretrained("RUN_DIR")' in card
    recipe_block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_block)["model"] == {"name_or_path": "distilbert/distilbert-base-uncased"}


def test_model_card_of_a_model_from_scratch_lists_its_data_files_and_no_base_model():
    recipe = load_recipe(RECIPES / "tiny/classification.yaml")
    header = _header(model_card(recipe, get_task("classification"), SUMMARY))
    assert "base_model" not in header
    assert header["datasets"] == ["train.jsonl", "validation.jsonl", "test.jsonl"]


def test_model_card_of_a_lora_run_loads_base_plus_adapter():
    recipe = resolve(load_recipe(RECIPES / "tiny/classification-lora.yaml"))
    card = model_card(recipe, get_task("classification"), {**SUMMARY, "trainable_parameters": 1_000})
    assert 'PeftModel.from_pretrained(base, "RUN_DIR")' in card and "RUN_DIR/base_model" in card
    assert "1,000 trained (LoRA adapter)" in card


# ------------------------------------------------------------------ plots


def _fake_run(path, task="classification", evals=True):
    """A run folder as far as the report needs one: recipe.yaml and trainer_state.json."""
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(f"task: {task}\n")
    history = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3 * (1 - s / 8), "epoch": s / 4} for s in range(1, 9)]
    if evals:
        history += [{"step": s, "eval_loss": 1.2 / s, "eval_accuracy": 0.5 + s / 20} for s in (4, 8)]
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return path


C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def _colours(png) -> set:
    """The colours of a drawn PNG's pixels, and its size."""
    import matplotlib.image

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    return {tuple(p) for p in pixels.reshape(-1, 3)}, pixels.shape[:2]


def test_plots_loss_learning_rate_and_the_main_metric(tmp_path):
    run = _fake_run(tmp_path / "a")
    drawn = plot_runs([run], run / "plots", "eval_accuracy")
    assert [p.name for p in drawn] == ["loss.png", "learning_rate.png", "accuracy.png"]
    colours = {p.name: _colours(p) for p in drawn}
    assert all(size == (440, 770) for _, size in colours.values())  # 7 x 4 inches at 110 dpi
    # Loss: train and validation curves in two colours; one curve elsewhere.
    assert {C0, C1} <= colours["loss.png"][0]
    assert C0 in colours["learning_rate.png"][0] and C1 not in colours["learning_rate.png"][0]
    assert C0 in colours["accuracy.png"][0]
    no_eval = _fake_run(tmp_path / "b", evals=False)
    assert [p.name for p in plot_runs([no_eval], tmp_path / "b-plots", "eval_accuracy")] == [
        "loss.png",
        "learning_rate.png",
    ]  # nothing to draw, no empty chart


def test_report_redraws_one_run_with_its_confusion_matrix_and_overlays_several(tmp_path):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b")
    save_confusion(a, ["neg", "pos"], [[3, 1], [0, 4]])
    assert [p.name for p in report([a])] == ["loss.png", "learning_rate.png", "accuracy.png", "confusion_matrix.png"]
    assert (a / "plots/confusion_matrix.png").stat().st_size > 5000
    with pytest.raises(LlmkitError, match="--output"):
        report([a, b])
    overlaid = report([a, b], tmp_path / "compare")
    assert [p.name for p in overlaid] == ["loss.png", "learning_rate.png", "accuracy.png"]  # one matrix per run only
    with pytest.raises(LlmkitError, match="no trainer_state.json"):
        (b / "trainer_state.json").unlink()
        report([b])


# ------------------------------------------------------------------ confusion matrix


def test_confusion_counts_rows_are_true_labels_columns_predictions():
    assert confusion_counts([1, 0, 1, 1], [1, 0, 0, 1], 3) == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_confusion_matrix_file_and_plot(tmp_path):
    save_confusion(tmp_path, ["neg", "pos"], [[3, 1], [0, 4]])
    assert json.loads((tmp_path / "confusion_matrix.json").read_text()) == {
        "labels": ["neg", "pos"],
        "matrix": [[3, 1], [0, 4]],
    }
    png = plot_confusion(tmp_path, tmp_path / "plots")
    assert png == tmp_path / "plots/confusion_matrix.png" and png.stat().st_size > 5000
    assert plot_confusion(tmp_path / "elsewhere", tmp_path / "plots") is None  # a run without one


def test_a_finished_run_keeps_its_validation_confusion_matrix(tmp_path):
    """`llmkit evaluate RUN --split test` runs the same metric: it must not replace the run's matrix."""
    save_confusion(tmp_path, ["neg", "pos"], [[3, 1], [0, 4]])
    (tmp_path / "summary.json").write_text("{}")
    save_confusion(tmp_path, ["neg", "pos"], [[9, 9], [9, 9]])
    assert json.loads((tmp_path / "confusion_matrix.json").read_text())["matrix"] == [[3, 1], [0, 4]]


# ------------------------------------------------------------------ end-of-run table


def test_end_of_run_table_shows_the_summary(capsys):
    from llmkit.console import print_report as _print_report

    _print_report({**SUMMARY, "train_tokens_per_second": 2918.4})
    lines = capsys.readouterr().out.splitlines()
    table = {line[2:30].strip(): line[30:].strip() for line in lines if line.startswith("  ")}
    assert lines[1] == "Done in 600s."
    assert table == {
        "task": "classification",
        "model": "distilbert/distilbert-base-uncased",
        "parameters": "66,955,010 (66,955,010 trained)",
        "steps": "420 (2.00 epochs, global batch 32)",
        "wall time": "600 s",
        "throughput": "22.8 samples/s, 2,918 tokens/s",
        "saved to": "runs/sst2 (model, recipe.yaml, summary.json, plots/, README.md)",
        "eval_loss": "0.2500",
        "eval_accuracy": "0.9100",
        "eval_f1_macro": "0.9050",
    }  # timings and the epoch stay in the JSON files
    assert lines[-1].startswith("Next: llmkit evaluate runs/sst2 --split test   |   llmkit predict runs/sst2")


def test_the_recipes_description_is_the_model_cards_first_line():
    recipe = load_recipe(RECIPES / "classification.yaml", ["description=Sentiment of film reviews, for the demo"])
    card = model_card(recipe, get_task("classification"), SUMMARY)
    assert "# sst2\n\nSentiment of film reviews, for the demo\n\n" in card
    assert "description: Sentiment of film reviews, for the demo" in card.split("```yaml\n")[1]  # and in the recipe
