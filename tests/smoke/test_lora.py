"""LoRA: adapters only in the output, base + adapter reloaded by evaluate/predict, merge, resume."""

import json
import shutil

import pytest
from conftest import RECIPES, ROOT, at_repo_root

from llmkit import checkpoints, engine, rundir
from llmkit import export as exporting
from llmkit import predict as predicting
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError

pytestmark = pytest.mark.smoke


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _recipe(name, out, *overrides):
    return resolve(load_recipe(RECIPES / "tiny" / name, [f"trainer.output_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def ner_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "ner-lora"
    with at_repo_root():
        summary = engine.train(_recipe("ner-lora.yaml", out, "trainer.save_strategy=steps", "trainer.save_steps=2"))
    return out, summary


def test_output_holds_the_adapter_not_the_model(ner_lora):
    out, summary = ner_lora
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()
    assert (out / "base_model" / "config.json").exists()  # labels, and the base weights (built from a config)
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["r"] == 8
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys)
    assert any("classifier" in k for k in keys)  # the new tagging head is saved with the adapter


def test_evaluate_and_predict_load_base_plus_adapter(ner_lora, tmp_path):
    out, summary = ner_lora
    metrics = engine.evaluate(rundir.recipe_for_evaluation(out, []), "validation")
    assert metrics["eval_f1"] == pytest.approx(summary["final_metrics"]["eval_f1"])
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "Alice flew to Paris ."}\n')
    predicting.predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "p.jsonl")
    assert len(json.loads((tmp_path / "p.jsonl").read_text())["tags"]) == 5


def test_export_merge_matches_base_plus_adapter(ner_lora, tmp_path):
    import torch
    import transformers

    from llmkit import modeling
    from llmkit.tasks import get_task

    out, _ = ner_lora
    assert exporting.export(out, tmp_path / "merged", merge=True) == "merged"
    merged = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    recipe = rundir.recipe_for_evaluation(out, [])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    task = get_task("ner")
    adapted = modeling.build_model(recipe, task, tok, task.model_kwargs(recipe)).eval()
    batch = tok(
        [["Bob", "lives", "in", "Tokyo"], ["Maria", "Lopez", "visited", "Berlin", "."]],
        is_split_into_words=True,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        diff = (merged(**batch).logits - adapted(**batch).logits).abs().max().item()
    assert diff < 1e-4
    assert merged.config.id2label == adapted.config.id2label
    assert exporting.export(out, tmp_path / "adapter") == "adapter"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(LlmkitError, match="not empty"):
        exporting.export(out, tmp_path / "adapter")


def test_lora_run_resumes_from_checkpoint(ner_lora, tmp_path):
    src, _ = ner_lora
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    for f in ("summary.json", "adapter_model.safetensors", "trainer_state.json"):
        (out / f).unlink()
    last = checkpoints.last_checkpoint(out)
    shutil.rmtree(last)
    keep = checkpoints.last_checkpoint(out)
    assert keep is not None and (keep / "adapter_model.safetensors").exists()
    recipe = _recipe("ner-lora.yaml", out, "trainer.save_strategy=steps", "trainer.save_steps=2")
    summary = engine.train(recipe)
    assert summary["steps"] == 8 and (out / "adapter_model.safetensors").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert min(h["step"] for h in state["log_history"] if "loss" in h) < int(keep.name.split("-")[1])


@pytest.mark.parametrize("name", ["classification-lora.yaml", "gpt2-lora.yaml"])
def test_lora_for_other_tasks(tmp_path, name):
    out = tmp_path / "run"
    summary = engine.train(_recipe(name, out, "trainer.max_steps=2"))
    assert summary["trainable_parameters"] < summary["parameters"]
    assert rundir.foreign_entries(out) == []  # --overwrite recognises everything a LoRA run writes
    assert (out / "adapter_model.safetensors").exists()
    metrics = engine.evaluate(rundir.recipe_for_evaluation(out, []), "validation")
    # The reloaded base + adapter is the trained model: the same loss up to float summation order.
    assert metrics["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-5)


def test_dry_run_counts_trainable_lora_parameters(tmp_path):
    est = engine.train(_recipe("ner-lora.yaml", tmp_path / "run"), dry_run=True)
    assert 0 < est["trainable_parameters"] < 0.2 * est["parameters"]
    assert not (tmp_path / "run").exists()


def test_quantization_needs_cuda(tmp_path):
    from llmkit.errors import RecipeError

    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        _recipe("ner-lora.yaml", tmp_path, "model.quantization={load_in_4bit: true}")
