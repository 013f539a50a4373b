"""The engine: prepare a recipe's data, build its model and Trainer (one place), train, evaluate."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import distill, fused, gpu, modeling, onnxrt, preflight, prepared, rundir, streams
from llmkit.checkpoints import drop_pickled_args, last_checkpoint, saving, trainer_with_atomic_checkpoints
from llmkit.clipping import SkipsUnitClip
from llmkit.config import resolve
from llmkit.data import GroupsByLengthFast, is_stream, token_lengths
from llmkit.errors import Interrupted, RecipeError
from llmkit.files import write_json
from llmkit.hf import global_batch_size
from llmkit.memory import keep_freed_memory, reuse_embedding_gradient
from llmkit.metrics import with_perplexity
from llmkit.recipe import Recipe
from llmkit.recipefile import dump_yaml
from llmkit.sharding import SavesOnEachNode, ShardsOnCpu, accelerate_shards, gather_full_model
from llmkit.tasks import get_task

if TYPE_CHECKING:
    from llmkit.tasks.base import Task

log = logging.getLogger("llmkit")


# --------------------------------------------------------------------------- data and model


def prepare_data(
    recipe: Recipe, task: Task, args: Any, only: str | None = None, report: dict | None = None
) -> tuple[Any, Any, Any]:
    """Load splits, get the tokenizer, tokenize (all splits, or `only` one).

    The main process goes first; the other ranks then find its work in the datasets cache.
    Given a `report` dict, the data preflight runs before tokenizing (its warnings logged,
    data.on_bad_rows applied) and fills it in.
    """
    from datasets import DatasetDict

    if recipe.data.prepared is not None or recipe.data.streaming:  # no raw splits in memory
        if recipe.data.prepared is not None:  # tokenized and packed once by `llmkit prepare`: read as it is
            tokenizer, tokenized, facts = prepared.load(recipe, task, only)
        else:
            with args.main_process_first(desc="opening the stream"), streams.read_errors(recipe):  # a tokenizer: once
                tokenizer, tokenized, facts = streams.load(recipe, task, args, only=only)
        if report is not None:
            report.update(facts)
        return None, tokenizer, tokenized
    with args.main_process_first(desc="loading and tokenizing data"):
        raw, tokenizer = preflight.load_data(recipe, task, need=only)
        if report is not None:
            report.update(preflight.preflight(recipe, task, raw, tokenizer))
        todo = DatasetDict({only: raw[only]}) if only else raw
        tokenized = task.preprocess(recipe, todo, tokenizer)
    return raw, tokenizer, tokenized


def prepare(recipe: Recipe, output: Path, overwrite: bool = False) -> dict:
    """`llmkit prepare`: tokenize and pack a pretraining recipe's corpus once into `output` (see prepared.py);
    returns its manifest."""
    task = get_task(recipe.task)
    if recipe.args is None:
        resolve(recipe)
    if task.stage != "pretrain":
        raise RecipeError(
            f"llmkit prepare packs pretraining corpora; task {task.name!r} tokenizes its rows at each run"
        )
    if recipe.data.streaming or recipe.data.prepared is not None:
        raise RecipeError("llmkit prepare reads the recipe's corpus: drop data.streaming and data.prepared")
    prepared.check_output(output, overwrite)
    report: dict = {}
    _, tokenizer, tokenized = prepare_data(recipe, task, recipe.args, report=report)
    return prepared.write(Path(output), recipe, task, tokenizer, tokenized, report, rundir.resolved_dict(recipe))


def check_packed(recipe: Recipe, task: Task) -> tuple[list[str], str | None]:
    """`llmkit check` of a recipe reading a prepared folder or a stream: loaded as a run loads it (its refusals
    included), then the folder verified, or the stream's first block packed; (lines, problem or None)."""
    _, _, tokenized = prepare_data(recipe, task, recipe.args)
    if recipe.data.prepared is not None:
        return prepared.verify(Path(recipe.data.prepared))
    held = ", ".join(f"{split} {len(d):,} blocks" for split, d in tokenized.items() if split != "train")
    return [f"stream: its first block packed; held out in memory: {held}"], None


def estimate(recipe: Recipe, task: Task, tokenizer: Any, tokenized: Any, teacher: Any = None) -> dict:
    """What a run will do: parameters, tokens per step, steps and epochs (no student weights are allocated
    unless it is cut from its teacher); with a teacher, its size and cost."""
    args = recipe.args
    model = _student(recipe, task, tokenizer, teacher, meta=True)
    if recipe.lora is not None:
        model = modeling.apply_lora(model, recipe, None)
    trainable, total = modeling.count_parameters(model)
    per_step = global_batch_size(args)
    streamed = is_stream(tokenized["train"])  # no length: max_steps is the run's length
    n_train = None if streamed else len(tokenized["train"])
    steps_per_epoch = max(
        1,
        math.ceil((n_train or 1) / (args.per_device_train_batch_size * args.world_size))
        // args.gradient_accumulation_steps,
    )
    steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    return {
        "task": task.name,
        "model": modeling.describe_model(recipe),
        "parameters": total,
        "trainable_parameters": trainable,
        "train_samples": "a stream (no length)" if streamed else n_train,
        "eval_samples": len(tokenized["validation"]) if "validation" in tokenized else 0,
        "samples_per_step": per_step,
        "tokens_per_step": per_step * recipe.data.max_length if task.tokens_per_sample else None,
        "steps": steps,
        "epochs": "a stream (no length)" if streamed else steps / steps_per_epoch,
        "bf16": bool(args.bf16),
        **({"distill": distill.facts(recipe, task, teacher, model)} if teacher is not None else {}),
    }


def _student(recipe: Recipe, task: Task, tokenizer: Any, teacher: Any, meta: bool = False) -> Any:
    """The model to train: cut from the teacher (model.from_teacher), else built from the recipe."""
    if recipe.model.from_teacher is None:
        onnxrt.refuse_training(recipe.model.name_or_path, "model.name_or_path")
        model = modeling.build_model(recipe, task, tokenizer, task.model_kwargs(recipe), meta=meta)
    else:
        model = distill.cut_from_teacher(teacher, recipe.model.from_teacher.layers)
        for key, value in task.model_kwargs(recipe).items():  # labels (checked equal to the teacher's), problem_type
            setattr(model.config, key, value)
        if task.seq2seq:
            modeling.configure_generation(model, recipe, tokenizer)
    if teacher is not None:
        distill.check_pair(recipe, teacher, model, tokenizer)
    return model


def speed_up(recipe: Recipe, task: Task, model: Any) -> None:
    """The task's own speed-ups (hooks), the fused tanh GELU (fused.py) and, in one CPU process, the word-embedding
    gradient kept across steps (memory.py), for training and evaluation alike."""
    task.prepare_model(recipe, model)
    fused.gelu_tanh(model)
    args = recipe.args
    if (
        args is not None
        and args.world_size == 1
        and args.use_cpu
        and not args.torch_compile
        and not accelerate_shards()
    ):
        reuse_embedding_gradient(model)


def model_for_training(
    recipe: Recipe, task: Task, tokenizer: Any, wipe: bool, teacher: Any = None
) -> tuple[Any, tuple[int, int]]:
    """The model a run trains: built (or cut from the teacher), the task's hooks installed, LoRA applied,
    CPU dropout made fast. A teacher is made ready to run beside it (frozen, eval, the run's precision).

    Under --overwrite the old run is deleted here, once data and model are ready (a failing new run
    never costs the old one) and before LoRA saves the base model's config into the folder.
    """
    args = recipe.args
    model = _student(recipe, task, tokenizer, teacher)
    speed_up(recipe, task, model)
    if teacher is not None:  # after the student was copied from it: the copy trains
        distill.prepare_teacher(teacher, args)
        speed_up(recipe, task, teacher)
    if wipe:
        rundir.wipe(recipe.output_dir, args)
    if recipe.lora is not None:
        model = modeling.apply_lora(model, recipe, recipe.output_dir if args.should_save else None)
    if recipe.model.fast_dropout and args.use_cpu and not args.torch_compile:  # inductor fuses its own dropout
        from llmkit import fastdropout

        fastdropout.install(model, choose_attention=recipe.model.attn_implementation is None)
    args.use_liger_kernel = args.use_liger_kernel or gpu.use_liger(recipe, task, model)
    if "ddp_find_unused_parameters" not in recipe.trainer:
        # DDP searches the autograd graph for parameters without a gradient at every step only where some exist.
        args.ddp_find_unused_parameters = modeling.has_unused_parameters(model)
    trainable, total = modeling.count_parameters(model)
    log.info(
        "Model %s: %s parameters, %s trainable (%.2f%%)",
        modeling.describe_model(recipe),
        f"{total:,}",
        f"{trainable:,}",
        100 * trainable / max(total, 1),
    )
    return model, (trainable, total)  # counted before the Trainer wraps or shards the model (FSDP, ZeRO-3)


def build_trainer(
    recipe: Recipe,
    task: Task,
    model: Any,
    tokenizer: Any,
    train: Any,
    evaluation: Any,
    callbacks: list | None = None,
    teacher: Any = None,
) -> Any:
    """The Trainer (Seq2SeqTrainer for seq2seq tasks, with atomic checkpoints) for training or evaluation;
    given a teacher, its training loss distils from it."""

    from llmkit.progress import show_progress

    compute_metrics, reduce_logits = task.metrics(recipe, tokenizer, evaluation)
    cls = trainer_class(task)
    if teacher is not None:
        cls = distill.trainer_with_teacher(cls, teacher, recipe, task)
    trainer = cls(
        model=model,
        args=recipe.args,
        data_collator=task.collator(recipe, tokenizer, model),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=reduce_logits,
        callbacks=callbacks,
    )
    show_progress(trainer)  # a named bar with loss/lr/samples/s, plain lines in pipes, nothing under --quiet
    return trainer


def trainer_class(task: Task) -> type:
    """The Trainer class for a task: Seq2SeqTrainer for seq2seq tasks, atomic checkpoints, FSDP on CPU, clipping
    that skips a multiply by 1 on CPU, the loss hook."""
    import transformers

    base = trainer_with_atomic_checkpoints(transformers.Seq2SeqTrainer if task.seq2seq else transformers.Trainer)
    # FSDP on CPU, a copy on each node, a stream's position in each checkpoint
    mixins = (ShardsOnCpu, SavesOnEachNode, streams.ResumesStreams, SkipsUnitClip, GroupsByLengthFast)
    base = type(base.__name__, (*mixins, base), {})
    if task.compute_loss is None:
        return base
    hook = task.compute_loss

    class TaskLossTrainer(base):
        def compute_loss(
            self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            loss, outputs = hook(model, inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return TaskLossTrainer


# --------------------------------------------------------------------------- train


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    callbacks: list | None = None,
) -> dict:
    """Run the recipe end to end: data, tokenizer, model, Trainer, outputs. Returns the summary.

    With dry_run=True everything is validated and tokenized but nothing is trained or written;
    the estimate (parameters, tokens per step, steps, epochs) is returned instead. `callbacks`
    (transformers TrainerCallback instances) are added to the Trainer, e.g. to time steps.
    """
    from transformers import set_seed

    task = get_task(recipe.task)
    if recipe.args is None:
        resolve(recipe)
    if recipe.distill is not None:
        distill.check_teacher_exists(recipe, task)
    ckpt, wipe = (None, False) if dry_run else rundir.plan_run(recipe, overwrite, resume)
    started = time.time()
    keep_freed_memory()
    set_seed(recipe.args.seed)
    report: dict = {}
    _, tokenizer, tokenized = prepare_data(recipe, task, recipe.args, report=report)
    teacher = distill.load_teacher(recipe, task, tokenizer) if recipe.distill is not None else None
    if dry_run:
        return estimate(recipe, task, tokenizer, tokenized, teacher)
    model, counts = model_for_training(recipe, task, tokenizer, wipe, teacher)
    evaluation = tokenized.get("validation")
    trainer = build_trainer(recipe, task, model, tokenizer, tokenized["train"], evaluation, callbacks, teacher)
    _start_run_folder(trainer, recipe, report)
    with streams.read_errors(recipe):
        train_metrics = _fit(trainer, ckpt)
    eval_metrics = _final_evaluation(trainer, task) if evaluation is not None else {}
    per_sample = recipe.data.max_length if recipe.data.streaming else mean_tokens(tokenized["train"])  # blocks
    facts = {"wall": time.time() - started, "tokens_per_sample": per_sample, "parameters": counts}
    if teacher is not None:
        facts["distill"] = _teacher_facts(recipe, task, tokenizer, teacher, trainer.model, evaluation)
    return _finish(trainer, recipe, task, train_metrics, eval_metrics, facts)


def _teacher_facts(recipe: Recipe, task: Task, tokenizer: Any, teacher: Any, student: Any, evaluation: Any) -> dict:
    """The distillation's settings and sizes, and the teacher's own metrics on the validation split (the same
    Trainer evaluation as the student's: their throughputs compare)."""
    import copy
    import dataclasses
    import tempfile

    out = distill.facts(recipe, task, teacher, student)
    if evaluation is not None:
        # What the metrics save (a confusion matrix) and the loggers record belong to the student: none of it here.
        with tempfile.TemporaryDirectory() as elsewhere:
            args = copy.copy(recipe.args)
            args.output_dir, args.logging_dir, args.report_to = elsewhere, elsewhere, []
            aside = dataclasses.replace(recipe, trainer={**recipe.trainer, "output_dir": elsewhere}, args=args)
            metrics = build_trainer(aside, task, teacher, tokenizer, None, evaluation).evaluate(
                metric_key_prefix="eval"
            )
        out["teacher_metrics"] = with_perplexity(metrics) if task.perplexity else metrics
    return out


def mean_tokens(ds: Any) -> float | None:
    """Tokens per sample of a tokenized split (input_ids without padding; exact for packed blocks)."""
    import pyarrow.compute as pc

    lengths = token_lengths(ds) if len(ds) else None
    return None if lengths is None else float(pc.mean(lengths).as_py())


def _start_run_folder(trainer: Any, recipe: Recipe, report: dict) -> None:
    """Before the first step: the resolved recipe (which marks the folder as an llmkit run) and the preflight,
    in every folder that saves (each node's with trainer.save_on_each_node)."""
    if trainer.args.should_save:
        out = recipe.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_yaml(rundir.resolved_dict(recipe)), encoding="utf-8")
        preflight.save_report(report, out / "preflight.json")


def _fit(trainer: Any, ckpt: Path | None) -> dict:
    """trainer.train, stopping cleanly on SIGINT/SIGTERM (Interrupted), then the final model saved."""
    from llmkit.interrupt import StopOnSignal

    out = Path(trainer.args.output_dir)
    stopper = StopOnSignal(trainer.args.world_size)
    trainer.add_callback(stopper)
    if ckpt is not None:
        trainer.args.eval_on_start = False  # the original run evaluated its start already; its log has that point
    with stopper:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if stopper.stopped:
        saved = last_checkpoint(out)
        raise Interrupted(f"stopped at step {trainer.state.global_step}; checkpoint saved in {saved}")
    gather_full_model(trainer)
    with saving("the final model", out):
        trainer.save_model()
    if trainer.args.should_save:
        drop_pickled_args(out)
    return dict(result.metrics)


def _final_evaluation(trainer: Any, task: Task) -> dict:
    """The metrics of the trained model on the validation split (those of the last evaluation if it was this model)."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last and last["step"] == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        # The Trainer just evaluated this very model: do not pay for it (or its generation) twice.
        metrics = {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
    else:
        metrics = trainer.evaluate(metric_key_prefix="eval")
    return with_perplexity(metrics) if task.perplexity else metrics


def _finish(trainer: Any, recipe: Recipe, task: Task, train_metrics: dict, eval_metrics: dict, facts: dict) -> dict:
    """The run's outputs (state, metrics, summary, plots, model card), summary.json last, in every folder that
    saves; returns the summary on the main process (the one that reports), {} on the others."""
    if not trainer.args.should_save:
        return {}
    from llmkit.report import write_run_report

    out = recipe.output_dir
    trainer.state.save_to_json(str(out / "trainer_state.json"))  # save_state() writes on rank 0 only
    write_json(out / "train_results.json", train_metrics)
    if eval_metrics:
        write_json(out / "eval_validation.json", eval_metrics)
    summary = rundir.summarize(recipe, task, trainer, train_metrics, eval_metrics, **facts)
    write_run_report(out, recipe, task, summary)
    write_json(out / rundir.FINISHED, summary)  # last: its presence marks the run finished
    return summary if trainer.is_world_process_zero() else {}


# --------------------------------------------------------------------------- evaluate


def evaluate(recipe: Recipe, split: str = "validation") -> dict:
    """Evaluate the recipe's model on one split; write eval_<split>.json to output_dir and return the metrics."""
    task = get_task(recipe.task)
    if recipe.args is None:
        resolve(recipe)
    keep_freed_memory()
    _, tokenizer, tokenized = prepare_data(recipe, task, recipe.args, only=split)
    model = modeling.build_model(recipe, task, tokenizer, task.model_kwargs(recipe))
    if not getattr(model, "is_exported_graph", False):  # an ONNX export runs as exported: no hooks to install
        speed_up(recipe, task, model)
    quantized = getattr(model, "is_quantized", False)  # an int8 export (torchao)
    if quantized:  # the Trainer refuses a quantized model without adapters, for training's sake
        model.is_quantized = False
    trainer = build_trainer(recipe, task, model, tokenizer, None, tokenized[split])
    if quantized:
        model.is_quantized = True
    metrics = trainer.evaluate(metric_key_prefix="eval")
    metrics = {
        "split": split,
        "samples": len(tokenized[split]),
        **(with_perplexity(metrics) if task.perplexity else metrics),
    }
    if trainer.is_world_process_zero():
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(recipe.output_dir / f"eval_{split}.json", metrics)
    return metrics


def check_stage(recipe: Recipe, stage: str) -> None:
    """`pretrain` runs pretraining tasks and `finetune` fine-tuning tasks; say so on a mix-up."""
    task = get_task(recipe.task)
    if task.stage != stage:
        other = "pretrain" if task.stage == "pretrain" else "finetune"
        raise RecipeError(f"task {task.name!r} is a {task.stage} task: run it with `llmkit {other}`")
