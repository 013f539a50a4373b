"""Train and evaluate: Trainer wiring, the output folder, metrics and the run summary."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llmkit import __version__
from llmkit.checkpoints import drop_pickled_args, last_checkpoint, saving, trainer_with_atomic_checkpoints
from llmkit.config import resolve
from llmkit.errors import Interrupted, LlmkitError, RecipeError
from llmkit.files import write_json
from llmkit.recipe import Recipe
from llmkit.recipefile import dump_yaml
from llmkit.tasks import Task, get_task

log = logging.getLogger("llmkit")

FINISHED = "summary.json"  # written last: its presence marks a finished run


# --------------------------------------------------------------------------- output folder


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe as it runs: merged, overridden, with llmkit's trainer defaults filled in."""
    raw = dict(recipe.raw)
    raw["trainer"] = dict(recipe.trainer)
    return raw


def plan_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> tuple[Path | None, bool]:
    """Decide what to do with an existing output_dir: (checkpoint to resume from, whether to wipe it).

    A finished run is never overwritten without --overwrite; an unfinished run of the same
    recipe resumes from its newest checkpoint; anything else in the folder is an error. Nothing
    is deleted here: the caller wipes only once data and model are ready, so a failing new run
    never costs the old one.
    """
    out = recipe.output_dir
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"trainer.output_dir {out} is a file; choose a folder: trainer.output_dir=runs/NAME")
    writable = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(writable, os.W_OK | os.X_OK):  # say so now, not after tokenizing and at the first save
        raise LlmkitError(
            f"trainer.output_dir {out} is not writable ({writable} is read-only for this user); "
            "make it writable or choose another trainer.output_dir"
        )
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise LlmkitError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return None, False
    if overwrite:
        if resume:
            raise LlmkitError("--overwrite and --resume contradict each other; pick one")
        check_replaceable(out, "set trainer.output_dir=runs/NEW_NAME")
        return None, True
    fix = "pass --overwrite to replace it, or set trainer.output_dir=runs/NEW_NAME"
    if (out / FINISHED).exists():
        raise LlmkitError(f"{out} holds a finished run; {fix}")
    saved = out / "recipe.yaml"
    if not saved.exists():
        raise LlmkitError(f"{out} is not empty and is not an llmkit run; {fix}")
    from llmkit.recipefile import parse_yaml

    def comparable(d: dict) -> dict:  # a run folder that was moved is still the same run
        d = json.loads(json.dumps(d, default=str))
        for key in ("output_dir", "resume_from_checkpoint"):
            d.get("trainer", {}).pop(key, None)
        return d

    same = comparable(parse_yaml(saved.read_text(encoding="utf-8"), str(saved)) or {}) == comparable(
        resolved_dict(recipe)
    )
    ckpt = last_checkpoint(out)
    if not same and not resume:
        raise LlmkitError(
            f"{out} holds an unfinished run of a different recipe; resume it with --resume "
            f"(keeping the new settings) or {fix}"
        )
    if ckpt is None:
        if resume:
            raise LlmkitError(f"--resume: {out} has no complete checkpoint yet; drop --resume to start over")
        log.warning("%s holds an unfinished run with no checkpoint: starting it again", out)
        return None, False
    log.warning("Resuming the unfinished run in %s from %s", out, ckpt.name)
    return ckpt, False


# What llmkit, the Trainer and the tokenizers write at the top of a run or export folder. `--overwrite`
# replaces such a folder only when everything in it is one of these: it never deletes the user's files.
OWN_ENTRIES = (
    "recipe.yaml",
    "README.md",
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",  # sentencepiece
    "summary.json",
    "preflight.json",
    "train_results.json",
    "eval_*.json",
    "all_results.json",
    "trainer_state.json",
    "confusion_matrix.json",
    "training_args.bin",
    "checkpoint-*",
    "runs",  # TensorBoard events
    "plots",
    "base_model",
    ".partial",  # checkpoints being written
)


def foreign_entries(folder: Path) -> list[str]:
    """The names at the top of `folder` that llmkit does not write (sorted)."""
    from fnmatch import fnmatchcase

    return sorted(p.name for p in folder.iterdir() if not any(fnmatchcase(p.name, g) for g in OWN_ENTRIES))


def check_replaceable(folder: Path, fix: str) -> None:
    """LlmkitError unless `folder` may be deleted by --overwrite: absent, empty, or an llmkit folder.

    An llmkit folder (a run or an export) holds its recipe.yaml and nothing llmkit did not write.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise LlmkitError(f"{folder} is a file, not an llmkit folder; --overwrite replaces only those: {fix}")
    if not any(folder.iterdir()):
        return
    if not (folder / "recipe.yaml").is_file():
        raise LlmkitError(
            f"{folder} is not empty and is not an llmkit run or export, so --overwrite will not delete it; {fix}"
        )
    foreign = foreign_entries(folder)
    if foreign:
        raise LlmkitError(
            f"{folder} holds {foreign[0]!r}, which llmkit did not write, so --overwrite will not delete the "
            f"folder; move {foreign[0]!r} out of it, or {fix}"
        )


def chosen_checkpoint(path: Path) -> Path:
    """trainer.resume_from_checkpoint: a complete checkpoint folder, or a run folder (its newest one)."""
    if path.is_dir() and not (path / "trainer_state.json").exists():
        path = last_checkpoint(path) or path
    if not (path / "trainer_state.json").is_file():
        raise LlmkitError(
            f"trainer.resume_from_checkpoint={path} is not a complete checkpoint (no trainer_state.json); "
            "name a checkpoint-N folder, or drop it and pass --resume for the newest one"
        )
    return path


# --------------------------------------------------------------------------- pipeline pieces


def prepare_data(
    recipe: Recipe, task: Task, args: Any, only: str | None = None, report: dict | None = None
) -> tuple[Any, Any, Any]:
    """Load splits, get the tokenizer, tokenize (all splits, or `only` one).

    The main process goes first; the other ranks then find its work in the datasets cache.
    Given a `report` dict, the data preflight runs before tokenizing (its warnings logged,
    data.on_bad_rows applied) and fills it in.
    """
    from datasets import DatasetDict

    from llmkit import preflight

    with args.main_process_first(desc="loading and tokenizing data"):
        raw, tokenizer = preflight.load_data(recipe, task)
        if only is not None and only not in raw:
            raise LlmkitError(
                f"the data has no {only!r} split (splits: {', '.join(raw)}); "
                f"name it with data.{only}=path/to/file or pick another --split"
            )
        if report is not None:
            report.update(preflight.preflight(recipe, task, raw, tokenizer))
        todo = DatasetDict({only: raw[only]}) if only else raw
        tokenized = task.preprocess(recipe, todo, tokenizer)
    return raw, tokenizer, tokenized


def _add_perplexity(task: Task, metrics: dict, prefix: str = "eval") -> dict:
    loss = metrics.get(f"{prefix}_loss")
    if task.perplexity and loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


def estimate(recipe: Recipe, task: Task, tokenizer: Any, tokenized: Any, model_kwargs: dict) -> dict:
    """What a run will do: parameters, tokens per step, steps and epochs (no weights are allocated)."""
    from llmkit import modeling

    args = recipe.args
    model = modeling.build_model(recipe, task, tokenizer, model_kwargs, meta=True)
    if recipe.lora is not None:
        model = modeling.apply_lora(model, recipe, None)
    trainable, total = modeling.count_parameters(model)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    n_train = len(tokenized["train"])
    steps_per_epoch = max(
        1, math.ceil(n_train / (args.per_device_train_batch_size * args.world_size)) // args.gradient_accumulation_steps
    )
    steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    return {
        "task": task.name,
        "model": modeling.describe_model(recipe),
        "parameters": total,
        "trainable_parameters": trainable,
        "train_samples": n_train,
        "eval_samples": len(tokenized["validation"]) if "validation" in tokenized else 0,
        "samples_per_step": per_step,
        "tokens_per_step": per_step * recipe.data.max_length if task.tokens_per_sample else None,
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "bf16": bool(args.bf16),
    }


def head_kwargs(task: Task, recipe: Recipe) -> dict:
    """The task's model-config kwargs; none for a labelled task whose labels are unknown (take the checkpoint's)."""
    if getattr(recipe.options, "labels", ()) is None:
        return {}
    return task.model_kwargs(recipe)


def keep_freed_memory() -> None:
    """glibc: reuse freed blocks below 32 MiB instead of returning them to the kernel.

    Training frees and reallocates the same activation-sized blocks every step. By default glibc
    hands blocks above a moving threshold back with munmap/trim, and each step then pays page faults
    to get them again: ~10% of a T5 step on CPU. M_MMAP_THRESHOLD=32 MiB (the most every glibc
    accepts; larger blocks still go back) and M_TRIM_THRESHOLD=1 GiB keep them. The trim setting is
    made only once the threshold is accepted: on its own it freezes the threshold at 128 KiB, which
    halves speed. LLMKIT_MALLOC=default opts out; other C libraries (musl, macOS) are left alone.
    """
    import platform

    if platform.libc_ver()[0] != "glibc" or os.environ.get("LLMKIT_MALLOC") == "default":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, 32 << 20) == 1:  # M_MMAP_THRESHOLD; mallopt returns 1 on success
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def trainer_class(task: Task) -> type:
    import transformers

    return trainer_with_atomic_checkpoints(transformers.Seq2SeqTrainer if task.seq2seq else transformers.Trainer)


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

    from llmkit import modeling

    task = get_task(recipe.task)
    if recipe.args is None:
        resolve(recipe)
    args = recipe.args
    ckpt, wipe = (None, False) if dry_run else plan_output_dir(recipe, overwrite, resume)
    if args.resume_from_checkpoint and not dry_run:
        ckpt = chosen_checkpoint(Path(args.resume_from_checkpoint))
        if wipe and ckpt.resolve().is_relative_to(recipe.output_dir.resolve()):
            raise LlmkitError(
                f"--overwrite would delete {ckpt}, the checkpoint trainer.resume_from_checkpoint names; "
                "resume into another trainer.output_dir, or drop --overwrite"
            )
    started = time.time()
    keep_freed_memory()
    set_seed(args.seed)
    report: dict = {}
    raw, tokenizer, tokenized = prepare_data(recipe, task, args, report=report)
    model_kwargs = task.model_kwargs(recipe)
    if dry_run:
        return estimate(recipe, task, tokenizer, tokenized, model_kwargs)

    model = modeling.build_model(recipe, task, tokenizer, model_kwargs)
    task.prepare_model(recipe, model)
    out = recipe.output_dir
    if wipe:
        if args.process_index == 0:  # every rank decided the same; only the main process deletes
            log.warning("--overwrite: deleting the previous contents of %s", out)
            shutil.rmtree(out)
        if args.world_size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
    if recipe.lora is not None:
        model = modeling.apply_lora(model, recipe, out if args.process_index == 0 else None)
    if recipe.model.fast_dropout and args.use_cpu and not args.torch_compile:  # inductor fuses its own dropout
        from llmkit import fastdropout

        fastdropout.install(model, choose_attention=recipe.model.attn_implementation is None)
    trainable, total = modeling.count_parameters(model)
    log.info(
        "Model %s: %s parameters, %s trainable (%.2f%%)",
        modeling.describe_model(recipe),
        f"{total:,}",
        f"{trainable:,}",
        100 * trainable / max(total, 1),
    )
    compute_metrics, reduce_logits = task.metrics(recipe, tokenizer, tokenized.get("validation"))
    trainer = trainer_class(task)(
        model=model,
        args=args,
        data_collator=task.collator(recipe, tokenizer, model),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=reduce_logits,
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_yaml(resolved_dict(recipe)), encoding="utf-8")
        from llmkit.preflight import save_report

        save_report(report, out / "preflight.json")

    from llmkit.progress import show_progress

    show_progress(trainer)  # a named bar with loss/lr/samples/s, plain lines in pipes, nothing under --quiet
    from llmkit.interrupt import StopOnSignal

    stopper = StopOnSignal(args.world_size)
    trainer.add_callback(stopper)
    if ckpt is not None:
        args.eval_on_start = False  # the original run evaluated its start already; its log has that point
    with stopper:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if stopper.stopped:
        saved = last_checkpoint(out)
        raise Interrupted(f"stopped at step {trainer.state.global_step}; checkpoint saved in {saved}")
    with saving("the final model", out):
        trainer.save_model()
    if trainer.is_world_process_zero():
        drop_pickled_args(out)
    train_metrics = dict(result.metrics)
    eval_metrics = {}
    if "validation" in tokenized:
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last and last["step"] == trainer.state.global_step and not args.load_best_model_at_end:
            # The Trainer just evaluated this very model: do not pay for it (or its generation) twice.
            eval_metrics = {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
        else:
            eval_metrics = trainer.evaluate(metric_key_prefix="eval")
        eval_metrics = _add_perplexity(task, eval_metrics)
    summary = {}
    if trainer.is_world_process_zero():
        trainer.save_state()
        write_json(out / "train_results.json", train_metrics)
        if eval_metrics:
            write_json(out / "eval_validation.json", eval_metrics)
        summary = _summary(recipe, task, trainer, train_metrics, eval_metrics, trainable, total, time.time() - started)
        from llmkit.report import write_run_report

        write_run_report(out, recipe, task, summary)
        write_json(out / FINISHED, summary)  # last: its presence marks the run finished
    return summary


def _summary(
    recipe: Recipe,
    task: Task,
    trainer: Any,
    train_metrics: dict,
    eval_metrics: dict,
    trainable: int,
    total: int,
    wall: float,
) -> dict:
    from llmkit import modeling

    args = trainer.args
    samples_s = train_metrics.get("train_samples_per_second")
    evals = [
        {
            "step": h["step"],
            "eval_loss": h["eval_loss"],
            **({"eval_perplexity": math.exp(min(h["eval_loss"], 50.0))} if task.perplexity else {}),
        }
        for h in trainer.state.log_history
        if "eval_loss" in h
    ]
    return {
        "task": task.name,
        "model": modeling.describe_model(recipe),
        "parameters": total,
        "trainable_parameters": trainable,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "world_size": args.world_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "bf16": bool(args.bf16),
        "wall_time_s": round(wall, 2),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "train_samples_per_second": samples_s,
        "train_tokens_per_second": samples_s * recipe.data.max_length if samples_s and task.tokens_per_sample else None,
        "train_loss": train_metrics.get("train_loss"),
        "final_metrics": eval_metrics,
        "evaluations": evals,
        "output_dir": str(recipe.output_dir),
        "llmkit_version": __version__,
    }


# --------------------------------------------------------------------------- evaluate


def recipe_for_evaluation(target: Path, overrides: list[str]) -> Recipe:
    """The recipe to evaluate with: a run folder's saved recipe pointed at its model, or a recipe file."""
    from llmkit.config import load_recipe, validate
    from llmkit.recipefile import apply_overrides, load_raw

    target = Path(target)
    if target.is_dir():
        saved = target / "recipe.yaml"
        if not saved.exists():
            raise LlmkitError(
                f"{target} has no recipe.yaml, so it is not an llmkit run; "
                "pass a recipe file instead (with model.name_or_path=CHECKPOINT)"
            )
        if not any((target / f).exists() for f in ("config.json", "adapter_config.json")):
            raise LlmkitError(
                f"{target} holds no trained model (the run did not finish); "
                f"finish it with `llmkit ... --resume`, or evaluate a checkpoint folder in it"
            )
        raw = load_raw(saved)
        config_file = next(
            (f for f in (target / "config.json", target / "base_model" / "config.json") if f.exists()), None
        )
        config = json.loads(config_file.read_text()) if config_file else {}
        if "id2label" in config and get_task(raw.get("task")).labels is not None:
            # The trained head's label order, not one re-derived from (possibly different) data.
            id2label = config["id2label"]
            raw.setdefault("options", {})["labels"] = [id2label[str(i)] for i in range(len(id2label))]
        raw["model"] = {k: v for k, v in raw.get("model", {}).items() if k in ("trust_remote_code", "revision")}
        raw["model"]["name_or_path"] = str(target)
        raw["tokenizer"] = {"name_or_path": str(target)}
        raw.setdefault("trainer", {})["output_dir"] = str(target)
        raw = apply_overrides(raw, overrides)
        recipe = validate(raw, str(saved))
    else:
        recipe = load_recipe(target, overrides)
    recipe.trainer = {**recipe.trainer, "report_to": "none"}
    return resolve(recipe)


def evaluate(recipe: Recipe, split: str = "validation") -> dict:
    """Evaluate the recipe's model on one split; write eval_<split>.json to output_dir and return the metrics."""
    from llmkit import modeling

    task = get_task(recipe.task)
    if recipe.args is None:
        resolve(recipe)
    args = recipe.args
    keep_freed_memory()
    raw, tokenizer, tokenized = prepare_data(recipe, task, args, only=split)
    model = modeling.build_model(recipe, task, tokenizer, task.model_kwargs(recipe))
    task.prepare_model(recipe, model)
    compute_metrics, reduce_logits = task.metrics(recipe, tokenizer, tokenized[split])
    trainer = trainer_class(task)(
        model=model,
        args=args,
        data_collator=task.collator(recipe, tokenizer, model),
        eval_dataset=tokenized[split],
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=reduce_logits,
    )
    from llmkit.progress import show_progress

    show_progress(trainer)  # an "evaluating"/"generating" bar; no metrics dict before the command's table
    metrics = _add_perplexity(task, trainer.evaluate(metric_key_prefix="eval"))
    metrics = {"split": split, "samples": len(tokenized[split]), **metrics}
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


# --------------------------------------------------------------------------- predict


def read_inputs(path: Path) -> list[dict]:
    """Rows to predict on: JSONL/JSON (objects), CSV (header row) or TXT (one text per line)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"input file not found: {path}; pass --input path/to/inputs.jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise LlmkitError(
                            f"{path}:{lineno}: invalid JSON ({e.msg}); one JSON object per line"
                        ) from None
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".txt":
        rows = [{"text": line} for line in text.splitlines() if line.strip()]
    else:
        raise LlmkitError(f"{path}: unknown input format {suffix or '(none)'}; use .jsonl, .json, .csv or .txt")
    if not rows:
        raise LlmkitError(f"{path}: no rows to predict on")
    if not all(isinstance(r, dict) for r in rows):
        raise LlmkitError(f"{path}: every row must be a JSON object with the input columns")
    return rows


def _previous_predictions(output: Path, inputs: Path, overwrite: bool) -> set[str] | None:
    """The fields of the first row of an existing predictions file that --overwrite may replace (None: no file).

    Only a JSON-lines file of objects qualifies (its prediction fields are checked once they are known);
    never the input file, a folder or any other file.
    """
    if not output.exists():
        return None
    if not overwrite:
        raise LlmkitError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    if output.resolve() == inputs.resolve():
        raise LlmkitError(f"--output {output} is the input file; write the predictions to another file")
    fix = "so --overwrite will not replace it; choose another --output"
    if not output.is_file():
        raise LlmkitError(f"{output} is not a file (a folder?), {fix}")
    try:
        with output.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        row = None
    if not isinstance(row, dict):
        raise LlmkitError(f"{output} is not a JSON-lines predictions file written by llmkit, {fix}")
    return set(row)


def predict(recipe: Recipe, input_path: Path, output_path: Path, overwrite: bool = False) -> int:
    """Run the recipe's model on a file of inputs and write one JSON line per input. Returns the row count."""
    from llmkit import modeling

    task = get_task(recipe.task)
    if task.predict is None:
        raise LlmkitError(f"task {task.name!r} has no predict; use `llmkit evaluate` for its metrics")
    output_path = Path(output_path)
    previous = _previous_predictions(output_path, Path(input_path), overwrite)
    rows = read_inputs(input_path)
    column = task.column(recipe, task.input_role)
    for i, row in enumerate(rows):
        if column not in row:
            if "text" not in row:
                raise LlmkitError(
                    f"{input_path}, row {i}: needs a {column!r} (or 'text') column (found: {', '.join(row) or 'none'})"
                )
            row[column] = row["text"]
    tokenizer = modeling.get_tokenizer(recipe, task, None)
    model = modeling.build_model(recipe, task, tokenizer, head_kwargs(task, recipe))
    model.eval()
    outputs = task.predict(recipe, model, tokenizer, rows)
    if previous is not None and outputs and not set(outputs[0]) <= previous:
        raise LlmkitError(
            f"{output_path} holds no {', '.join(map(repr, outputs[0]))} predictions, so it is not llmkit's "
            "output and --overwrite will not replace it; choose another --output"
        )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row, out in zip(rows, outputs, strict=True):
            f.write(json.dumps({**row, **out}, ensure_ascii=False) + "\n")
    tmp.replace(output_path)
    return len(rows)


# --------------------------------------------------------------------------- export


def export(run_dir: Path, out_dir: Path, merge: bool = False, overwrite: bool = False) -> str:
    """Write a clean, standalone copy of a run's model: the adapter as is, or (merge) base + adapter merged.

    Returns what was written: "model", "adapter" or "merged".
    """
    from llmkit import modeling

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    recipe = recipe_for_evaluation(run_dir, [])
    is_adapter = (run_dir / "adapter_config.json").exists()
    if merge and not is_adapter:
        raise LlmkitError(f"{run_dir} holds a full model, not a LoRA adapter: nothing to merge; drop --merge")
    if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LlmkitError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    check_replaceable(out_dir, "choose another folder to export to")
    task = get_task(recipe.task)
    tokenizer = modeling.get_tokenizer(recipe, task, None)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge:
        model = modeling.build_model(recipe, task, tokenizer, head_kwargs(task, recipe))
        model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")  # how it was trained; marks an llmkit export
        kind = "merged"
    else:
        keep = {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            "merges.txt",
            "vocab.json",
            "spiece.model",
            "recipe.yaml",
            "README.md",
        }
        tmp.mkdir(parents=True)
        for f in run_dir.iterdir():
            if f.name in keep or f.name.startswith("model-") and f.suffix == ".safetensors":
                shutil.copy2(f, tmp / f.name)
        if (run_dir / modeling.BASE_DIR).is_dir():
            shutil.copytree(run_dir / modeling.BASE_DIR, tmp / modeling.BASE_DIR)
        kind = "adapter" if is_adapter else "model"
    if out_dir.is_dir():  # --overwrite (checked above): the old export goes only once the new one is complete
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return kind
