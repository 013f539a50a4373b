"""The tiny pretraining recipes end to end: train, outputs load back, refuse to overwrite, resume."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import RECIPES

from llmkit import checkpoints, engine, rundir
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError

pytestmark = pytest.mark.smoke


def _recipe(name, out, *overrides):
    return resolve(load_recipe(RECIPES / "tiny" / name, [f"trainer.output_dir={out}", *overrides]))


@pytest.mark.parametrize("name, auto", [("bert.yaml", "AutoModelForMaskedLM"), ("gpt2.yaml", "AutoModelForCausalLM")])
def test_tiny_pretraining_end_to_end(tmp_path, name, auto):
    import transformers

    out = tmp_path / "run"
    summary = engine.train(_recipe(name, out))
    assert summary["steps"] == 6 and summary["parameters"] > 0
    assert rundir.foreign_entries(out) == []  # --overwrite recognises everything a run writes
    assert math.isfinite(summary["train_loss"])
    assert math.isfinite(summary["final_metrics"]["eval_loss"])
    assert summary["final_metrics"]["eval_perplexity"] == pytest.approx(math.exp(summary["final_metrics"]["eval_loss"]))
    for f in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "recipe.yaml",
        "train_results.json",
        "eval_validation.json",
        "summary.json",
        "trainer_state.json",
    ):
        assert (out / f).exists(), f
    # safetensors, JSON and YAML only: no pickle anywhere in the run (not even the Trainer's training_args.bin)
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pkl", ".pickle")]
    assert json.loads((out / "summary.json").read_text())["task"] == summary["task"]
    model = getattr(transformers, auto).from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("the function returns a value", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size == len(tok)
    # A finished run is never overwritten silently.
    with pytest.raises(LlmkitError, match="holds a finished run"):
        engine.train(_recipe(name, out))


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    engine.train(_recipe("gpt2.yaml", out))
    # Make it look killed after the step-3 checkpoint: no final outputs, no later checkpoint.
    for f in ("summary.json", "model.safetensors", "trainer_state.json"):
        (out / f).unlink()
    shutil.rmtree(out / "checkpoint-6")
    assert checkpoints.last_checkpoint(out).name == "checkpoint-3"
    summary = engine.train(_recipe("gpt2.yaml", out))
    assert summary["steps"] == 6
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == [2, 4, 6]  # step 2 came from the checkpoint: training went on from step 3


def test_resume_and_overwrite_flags(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LlmkitError, match="no run to resume"):
        engine.train(_recipe("bert.yaml", out), resume=True)
    engine.train(_recipe("bert.yaml", out, "trainer.max_steps=3"))
    with pytest.raises(LlmkitError, match="contradict"):
        engine.train(_recipe("bert.yaml", out), overwrite=True, resume=True)
    # --overwrite with a broken new recipe: the failure comes before anything is deleted.
    with pytest.raises(LlmkitError, match="data file not found"):
        engine.train(_recipe("bert.yaml", out, "data.source=null", "data.train=missing.txt"), overwrite=True)
    assert (out / "summary.json").exists() and (out / "model.safetensors").exists()
    summary = engine.train(_recipe("bert.yaml", out), overwrite=True)
    assert summary["steps"] == 6


def test_output_dir_guards(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(LlmkitError, match="is a file"):
        engine.train(_recipe("bert.yaml", afile))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LlmkitError, match="not an llmkit run"):
        engine.train(_recipe("bert.yaml", foreign))
    assert (foreign / "notes.txt").read_text() == "mine"
    # A read-only output_dir (simulated: tests may run as root, whom permissions do not stop) fails at once.
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda p, mode: False if Path(p) == readonly else real_access(p, mode))
        with pytest.raises(LlmkitError, match=r"readonly/run is not writable .*choose another trainer.output_dir"):
            engine.train(_recipe("bert.yaml", readonly / "run"))


def test_dry_run_estimates_without_writing(tmp_path):
    out = tmp_path / "run"
    est = engine.train(_recipe("bert.yaml", out), dry_run=True)
    assert est["steps"] == 6 and est["samples_per_step"] == 8 and est["tokens_per_step"] == 8 * 32
    assert est["parameters"] > 10_000
    assert not out.exists()


def test_empty_corpus_is_a_data_error(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n   \n\n")
    with pytest.raises(LlmkitError, match="empty"):
        engine.train(_recipe("bert.yaml", tmp_path / "run", "data.source=null", f"data.train={corpus}"))


def test_evaluate_a_finished_run(tmp_path):
    out = tmp_path / "run"
    trained = engine.train(_recipe("bert.yaml", out))
    recipe = rundir.recipe_for_evaluation(out, [])
    metrics = engine.evaluate(recipe, "validation")
    assert metrics["samples"] > 0 and math.isfinite(metrics["eval_perplexity"])
    assert (out / "eval_validation.json").exists()
    # Same model, same data, the same evaluation masks (drawn once, seeded by position): the same loss, up to
    # float summation order.
    assert metrics["eval_loss"] == pytest.approx(trained["final_metrics"]["eval_loss"], rel=1e-5)
