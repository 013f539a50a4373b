"""`llmkit export --format onnx / --quantize int8` on tiny runs of every task, and what reads the exports:
predict and evaluate answer from an exported folder as from its run (offline, seconds)."""

import builtins
import json

import pytest
from conftest import RECIPES, ROOT, at_repo_root

from llmkit import engine, rundir
from llmkit import export as exporting
from llmkit import predict as predicting
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError

pytestmark = pytest.mark.smoke


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _train(base, name, *overrides):
    out = base / name
    with at_repo_root():
        engine.train(resolve(load_recipe(RECIPES / "tiny" / f"{name}.yaml", [f"trainer.output_dir={out}", *overrides])))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny finished run per task (classification trained long enough to predict both labels)."""
    base = tmp_path_factory.mktemp("export")
    return {
        "classification": _train(base, "classification", "trainer.num_train_epochs=6"),
        "ner": _train(base, "ner"),
        "bert": _train(base, "bert"),
        "gpt2": _train(base, "gpt2"),
        "ner-lora": _train(base, "ner-lora"),
    }


def _facts(folder):
    return json.loads((folder / "export.json").read_text())


def _predict(target, tmp_path, lines, name="p.jsonl", **kw):
    inputs = tmp_path / f"{name}.in.jsonl"
    inputs.write_text("".join(json.dumps(row) + "\n" for row in lines))
    predicting.predict(rundir.recipe_for_evaluation(target, FP32), inputs, tmp_path / name, **kw)
    return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]


FP32 = ["trainer.bf16=false"]  # the run as exported: its default evaluation autocasts to bf16 where the CPU has it
REVIEWS = [{"text": t} for t in ("a fine film", "dull and long", "great acting , weak plot", "bad")]
SENTENCES = [{"tokens": "Alice flew to Paris ."}, {"tokens": "Bob works at Acme in London ."}]


@pytest.mark.parametrize("task,rows", [("classification", REVIEWS), ("ner", SENTENCES), ("ner-lora", SENTENCES)])
def test_onnx_export_matches_pytorch_in_predict_and_evaluate(runs, tmp_path, task, rows):
    run = runs[task]
    out = tmp_path / "onnx"
    assert exporting.export(run, out, fmt="onnx") == "onnx fp32"
    facts = _facts(out)
    assert facts["format"] == "onnx" and facts["precision"] == "fp32" and facts["opset"] == 18
    assert facts["parity"]["fp32"]["max_abs_diff"] < 1e-4 and facts["parity"]["fp32"]["argmax_agreement"] == 1.0
    assert facts["parity"]["rows"].endswith("validation rows")
    assert facts["files"]["model.onnx"] == (out / "model.onnx").stat().st_size
    assert {"config.json", "recipe.yaml", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "pipeline_tag:" in (out / "README.md").read_text()
    # A LoRA run is merged: the export is one standalone graph, no adapter.
    assert not (out / "adapter_config.json").exists() and not list(out.glob("*.safetensors"))

    from_run = _predict(run, tmp_path, rows, "run.jsonl")
    from_onnx = _predict(out, tmp_path, rows, "onnx.jsonl", batch_size=1)
    key = "label" if task == "classification" else "tags"
    assert [r[key] for r in from_onnx] == [r[key] for r in from_run]
    if task == "classification":
        assert [r["score"] for r in from_onnx] == pytest.approx([r["score"] for r in from_run], abs=2e-4)

    run_metrics = engine.evaluate(rundir.recipe_for_evaluation(run, FP32), "validation")
    onnx_metrics = engine.evaluate(rundir.recipe_for_evaluation(out, FP32), "validation")
    assert onnx_metrics["eval_loss"] == pytest.approx(run_metrics["eval_loss"], rel=1e-4)
    main = "eval_accuracy" if task == "classification" else "eval_f1"
    assert onnx_metrics[main] == run_metrics[main]


def test_mlm_head_exports_and_evaluates_like_its_run(runs, tmp_path):
    run, out = runs["bert"], tmp_path / "bert-onnx"
    exporting.export(run, out, fmt="onnx")
    assert _facts(out)["parity"]["fp32"]["max_abs_diff"] < 1e-4
    run_metrics = engine.evaluate(rundir.recipe_for_evaluation(run, FP32), "validation")
    onnx_metrics = engine.evaluate(rundir.recipe_for_evaluation(out, FP32), "validation")
    assert onnx_metrics["eval_loss"] == pytest.approx(run_metrics["eval_loss"], rel=1e-4)
    fills = _predict(out, tmp_path, [{"text": "the [MASK] of the"}], "fill.jsonl")
    assert fills == _predict(run, tmp_path, [{"text": "the [MASK] of the"}], "fill-run.jsonl")


def test_int8_exports_are_smaller_and_reload(runs, tmp_path):
    run = runs["classification"]
    onnx8, pt8 = tmp_path / "onnx8", tmp_path / "pt8"
    assert exporting.export(run, onnx8, fmt="onnx", quantize="int8") == "onnx int8"
    facts = _facts(onnx8)
    assert facts["precision"] == "int8" and 0 < facts["size_ratio"] < 1
    assert facts["size_ratio"] == pytest.approx(facts["files"]["model.onnx"] / facts["fp32_bytes"], abs=1e-4)
    assert set(facts["parity"]) == {"rows", "fp32", "int8"} and not (onnx8 / "model.fp32.onnx").exists()
    assert len(_predict(onnx8, tmp_path, REVIEWS, "o8.jsonl")) == len(REVIEWS)
    assert "eval_accuracy" in engine.evaluate(rundir.recipe_for_evaluation(onnx8, []), "validation")

    assert exporting.export(run, pt8, quantize="int8") == "pytorch int8"
    facts = _facts(pt8)
    assert facts["size_ratio"] < 1 and facts["parity"]["int8"]["argmax_agreement"] > 0.5
    assert "eval_accuracy" in engine.evaluate(rundir.recipe_for_evaluation(pt8, []), "validation")
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(pt8)  # torchao, from its config
    assert type(model.classifier.weight).__name__ != "Parameter" or "Quantized" in repr(model.classifier.weight)
    labels = [r["label"] for r in _predict(pt8, tmp_path, REVIEWS, "p8.jsonl")]
    assert set(labels) <= {"negative", "positive"} and len(labels) == len(REVIEWS)
    # Both int8 exports are for inference, as the ONNX one: training from one or distilling with one is one line.
    student = RECIPES / "tiny" / "classification.yaml"
    for out, says in [(onnx8, "an ONNX export"), (pt8, "an int8 export")]:
        for key in ("model.name_or_path", "distill.teacher"):
            with pytest.raises(LlmkitError, match=f"{key} {out} is {says}, which only predicts and evaluates"):
                recipe = resolve(load_recipe(student, [f"{key}={out}", f"trainer.output_dir={tmp_path / key}"]))
                engine.train(recipe)


def test_clm_predict_generates_a_completion_per_prompt(runs, tmp_path):
    prompts = [{"text": "To be or"}, {"text": "the king"}, {"text": "a much longer prompt than the others here"}]
    rows = _predict(runs["gpt2"], tmp_path, prompts, "gen.jsonl", batch_size=2)
    assert [r["text"] for r in rows] == [p["text"] for p in prompts]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    # Left padding: a prompt's completion does not depend on the batch it was generated in.
    alone = _predict(runs["gpt2"], tmp_path, prompts[:1], "gen1.jsonl", batch_size=1)
    assert alone[0]["completion"] == rows[0]["completion"]


LLAMA = "model.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}"


def test_a_clm_run_quantizes_to_int8_and_still_generates(runs, tmp_path):
    with pytest.raises(LlmkitError, match="torchao found no Linear layer to quantize in GPT2LMHeadModel"):
        exporting.export(runs["gpt2"], tmp_path / "gpt2-int8", quantize="int8")  # Conv1D blocks
    assert not (tmp_path / "gpt2-int8").exists() and not (tmp_path / ".gpt2-int8.tmp").exists()
    llama, out = _train(tmp_path, "gpt2", LLAMA), tmp_path / "llama-int8"
    assert exporting.export(llama, out, quantize="int8") == "pytorch int8"
    facts = _facts(out)
    # q, k, v, o and the MLP's three; transformers keeps a language model's output head (lm_head) in full precision
    assert facts["quantized_layers"] == 7 and facts["parity"]["rows"].endswith("validation rows")
    rows = _predict(out, tmp_path, [{"text": "To be or"}, {"text": "the king"}], "gen8.jsonl")
    assert all(isinstance(r["completion"], str) for r in rows)


def test_mlm_predict_fills_each_mask_with_top_k(runs, tmp_path):
    rows = _predict(runs["bert"], tmp_path, [{"text": "the [MASK] and the [MASK] ."}], "fill.jsonl")
    (row,) = rows
    assert len(row["fills"]) == 2 and all(len(f) == 5 for f in row["fills"])
    scores = [c["score"] for c in row["fills"][0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert "[MASK]" not in row["filled"]
    with pytest.raises(LlmkitError, match=r"row 1 has no \[MASK\]"):
        _predict(runs["bert"], tmp_path, [{"text": "nothing to fill"}], "none.jsonl")
    with pytest.raises(LlmkitError, match=r"row 2: a \[MASK\] lies beyond data.max_length=32 tokens"):
        _predict(runs["bert"], tmp_path, [{"text": "a [MASK]"}, {"text": "word " * 40 + "[MASK]"}], "long.jsonl")
    with pytest.raises(LlmkitError, match="row 2 has an empty prompt"):
        _predict(runs["gpt2"], tmp_path, [{"text": "To be"}, {"text": " "}], "empty.jsonl")


def test_export_refusals_are_one_line(runs, tmp_path, monkeypatch):
    cls = runs["classification"]
    with pytest.raises(LlmkitError, match="not clm models, which generate token by token; export as PyTorch"):
        exporting.export(runs["gpt2"], tmp_path / "x", fmt="onnx")
    with pytest.raises(LlmkitError, match="unknown export format 'tflite'"):
        exporting.export(cls, tmp_path / "x", fmt="tflite")
    with pytest.raises(LlmkitError, match="unknown precision 'int4'"):
        exporting.export(cls, tmp_path / "x", fmt="onnx", quantize="int4")
    with pytest.raises(LlmkitError, match="--merge is for plain PyTorch copies"):
        exporting.export(cls, tmp_path / "x", fmt="onnx", merge=True)
    assert not (tmp_path / "x").exists()
    for out in (cls, cls / "sub", cls.parent):  # --overwrite would delete the run it exports
        with pytest.raises(LlmkitError, match="or holds it or lies inside it; export to a folder of its own"):
            exporting.export(cls, out, fmt="onnx", overwrite=True)
    assert (cls / "summary.json").exists()

    real_import = builtins.__import__

    def without_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxscript)
    with pytest.raises(LlmkitError, match=r"needs onnxscript, which is not installed; pip install 'llmkit\[export\]'"):
        exporting.export(cls, tmp_path / "x", fmt="onnx")


def test_a_damaged_onnx_export_is_one_line(runs, tmp_path):
    out = tmp_path / "onnx"
    exporting.export(runs["classification"], out, fmt="onnx")
    with pytest.raises(LlmkitError, match=r"already converted \(ONNX or int8\); export its source run folder"):
        exporting.export(out, tmp_path / "again", fmt="onnx")
    # An export is for inference: training from it, or distilling with it, is one line.
    student = RECIPES / "tiny" / "classification.yaml"
    for key in ("model.name_or_path", "distill.teacher"):
        with pytest.raises(LlmkitError, match=f"{key} {out} is an ONNX export, which only predicts and evaluates"):
            recipe = resolve(load_recipe(student, [f"{key}={out}", f"trainer.output_dir={tmp_path / key}"]))
            engine.train(recipe)
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:1000])
    with pytest.raises(LlmkitError, match=r"model.onnx is not a loadable ONNX model \(.*\); export it again"):
        _predict(out, tmp_path, REVIEWS, "broken.jsonl")
