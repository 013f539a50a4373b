"""The run folder: what may be written or replaced there (--overwrite), whether to resume, the run's summary,
and the recipe of a finished run."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import __version__, modeling, prepared
from llmkit.checkpoints import checkpoints, damage, last_checkpoint
from llmkit.config import load_recipe, resolve, validate
from llmkit.errors import LlmkitError
from llmkit.hf import global_batch_size
from llmkit.metrics import perplexity
from llmkit.recipe import Recipe
from llmkit.recipefile import apply_overrides, load_raw, parse_yaml
from llmkit.tasks import get_task

if TYPE_CHECKING:
    from llmkit.tasks.base import Task

log = logging.getLogger("llmkit")

FINISHED = "summary.json"  # written last: its presence marks a finished run


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe as it runs: merged, overridden, with llmkit's trainer defaults filled in."""
    raw = dict(recipe.raw)
    raw["trainer"] = dict(recipe.trainer)
    return raw


# What llmkit, the Trainer and the tokenizers write at the top of a run or export folder. `--overwrite`
# replaces such a folder only when everything in it is one of these: it never deletes the user's files.
MODEL_FILES = (  # the model and its tokenizer, as save_pretrained writes them (what `llmkit export` copies)
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
    "model.onnx",  # llmkit export --format onnx, and its facts
    "export.json",
)
OWN_ENTRIES = (
    *MODEL_FILES,
    "recipe.yaml",
    "README.md",
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

    def comparable(d: dict) -> dict:  # a run folder that was moved is still the same run
        d = json.loads(json.dumps(d, default=str))
        for key in ("output_dir", "resume_from_checkpoint"):
            d.get("trainer", {}).pop(key, None)
        return d

    same = comparable(parse_yaml(saved.read_text(encoding="utf-8"), str(saved)) or {}) == comparable(
        resolved_dict(recipe)
    )
    ckpt = last_checkpoint(out, verified=True)
    if not same and ckpt is None:  # nothing to resume: only a fresh start can take this folder
        raise LlmkitError(f"{out} holds an unfinished run of a different recipe with no checkpoint to resume; {fix}")
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


def chosen_checkpoint(path: Path) -> Path:
    """trainer.resume_from_checkpoint: a complete checkpoint folder, or a run folder (its newest one)."""
    if path.is_dir() and not (path / "trainer_state.json").exists():
        path = last_checkpoint(path, verified=True) or path
    if not (path / "trainer_state.json").is_file():
        raise LlmkitError(
            f"trainer.resume_from_checkpoint={path} is not a complete checkpoint (no trainer_state.json); "
            "name a checkpoint-N folder, or drop it and pass --resume for the newest one"
        )
    problem = damage(path)
    if problem is not None:
        raise LlmkitError(f"trainer.resume_from_checkpoint={path} is damaged ({problem}); name an older checkpoint")
    return path


def verify_run(folder: Path) -> list[tuple[str, str | None]]:
    """`llmkit check RUN_DIR`: each checkpoint of a run folder, newest first, with what is wrong with it (or None)."""
    if not (folder / "recipe.yaml").is_file():
        raise LlmkitError(
            f"{folder} has no recipe.yaml, so it is not an llmkit run; check takes a recipe or a run folder"
        )
    return [(ckpt.name, damage(ckpt)) for ckpt in checkpoints(folder)]


def check_folder(folder: Path) -> tuple[list[str], str | None]:
    """`llmkit check FOLDER`: a run folder's checkpoints against their manifests, or a prepared folder (`llmkit
    prepare`) against its own; (lines to print, what is damaged or None)."""
    if (folder / prepared.MANIFEST).is_file():
        return prepared.verify(folder)
    found = verify_run(folder)
    lines = [f"  {name:<24} {'damaged: ' + problem if problem else 'intact'}" for name, problem in found]
    damaged = [name for name, problem in found if problem]
    problem = f"{folder}: damaged checkpoints: {', '.join(damaged)}; --resume skips them" if damaged else None
    return lines or [f"{folder} has no checkpoint"], problem


def plan_run(recipe: Recipe, overwrite: bool, resume: bool) -> tuple[Path | None, bool]:
    """(checkpoint to resume from, whether to wipe output_dir first): the folder policy plus the recipe's
    trainer.resume_from_checkpoint, which --overwrite may not delete."""
    ckpt, wipe = plan_output_dir(recipe, overwrite, resume)
    named = recipe.args.resume_from_checkpoint
    if named:
        ckpt = chosen_checkpoint(Path(named))
        if wipe and ckpt.resolve().is_relative_to(recipe.output_dir.resolve()):
            raise LlmkitError(
                f"--overwrite would delete {ckpt}, the checkpoint trainer.resume_from_checkpoint names; "
                "resume into another trainer.output_dir, or drop --overwrite"
            )
    return _agreed(ckpt, recipe), wipe


def _agreed(ckpt: Path | None, recipe: Recipe) -> Path | None:
    """Every process resumes from the same step: nodes without a shared filesystem (save_on_each_node) each
    choose from their own copy, and a damaged checkpoint on one node must not split the run."""
    args = recipe.args
    if args.world_size == 1:
        return ckpt
    import torch.distributed as dist

    if not dist.is_initialized():
        return ckpt
    names: list = [None] * args.world_size
    dist.all_gather_object(names, ckpt.name if ckpt else None)
    if len(set(names)) > 1:
        seen = ", ".join(sorted({str(n or "a fresh start") for n in names}))
        raise LlmkitError(
            f"the processes would resume from different checkpoints ({seen}) of {recipe.output_dir}: each node "
            "reads its own copy (save_on_each_node); copy the newest complete checkpoint to every node, or name "
            "one with trainer.resume_from_checkpoint=PATH"
        )
    return ckpt


def wipe(out: Path, args: Any) -> None:
    """--overwrite (checked by plan_output_dir): delete the previous run; every rank waits for it."""
    if args.should_save:  # every rank decided the same; the main process (of each node that saves) deletes
        log.warning("--overwrite: deleting the previous contents of %s", out)
        shutil.rmtree(out)
    if args.world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def summarize(
    recipe: Recipe,
    task: Task,
    trainer: Any,
    train_metrics: dict,
    eval_metrics: dict,
    wall: float,
    tokens_per_sample: float | None,
    parameters: tuple[int, int],
    distill: dict | None = None,
) -> dict:
    """The run's summary.json: what was trained, how fast (samples/s, and tokens/s from the training data's
    mean tokens per sample), and every metric of every evaluation."""
    args = trainer.args
    trainable, total = parameters  # (trainable, total), counted before training wrapped the model
    samples_s = train_metrics.get("train_samples_per_second")
    evals = [
        {
            **{k: v for k, v in h.items() if k.startswith("eval_") or k in ("step", "epoch")},
            **({"eval_perplexity": perplexity(h["eval_loss"])} if task.perplexity else {}),
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
        "global_batch_size": global_batch_size(args),
        "bf16": getattr(args, "mixed_precision", None) == "bf16" or bool(args.bf16),  # what ran, launcher included
        "wall_time_s": round(wall, 2),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "train_samples_per_second": samples_s,
        "train_tokens_per_second": round(samples_s * tokens_per_sample, 1) if samples_s and tokens_per_sample else None,
        "train_loss": train_metrics.get("train_loss"),
        "final_metrics": eval_metrics,
        "evaluations": evals,
        "output_dir": str(recipe.output_dir),
        "llmkit_version": __version__,
        **({"distill": distill} if distill else {}),
    }


def recipe_for_evaluation(target: Path, overrides: list[str]) -> Recipe:
    """The recipe to evaluate with: a run folder's saved recipe pointed at its model, or a recipe file."""
    target = Path(target)
    if target.is_dir():
        saved = target / "recipe.yaml"
        if not saved.exists():
            raise LlmkitError(
                f"{target} has no recipe.yaml, so it is not an llmkit run; "
                "pass a recipe file instead (with model.name_or_path=CHECKPOINT)"
            )
        if not any((target / f).exists() for f in ("config.json", "adapter_config.json")):
            if any(target.glob("pytorch_model_fsdp_*")):
                raise LlmkitError(
                    f"{target} is a sharded FSDP checkpoint (one shard per process), not a model; finish the run "
                    "with `--resume` for a whole model, or save checkpoints whole: trainer.fsdp_config.state_dict_type: "
                    "FULL_STATE_DICT"
                )
            raise LlmkitError(
                f"{target} holds no trained model (the run did not finish); "
                f"finish it with `llmkit ... --resume`, or evaluate a checkpoint folder in it"
            )
        raw = load_raw(saved)
        config_file = next(
            (f for f in (target / "config.json", modeling.base_dir(target) / "config.json") if f.exists()), None
        )
        config = json.loads(config_file.read_text()) if config_file else {}
        if "id2label" in config and get_task(raw.get("task")).labels is not None:
            # The trained head's label order, not one re-derived from (possibly different) data.
            id2label = config["id2label"]
            raw.setdefault("options", {})["labels"] = [id2label[str(i)] for i in range(len(id2label))]
        raw["model"] = {k: v for k, v in raw.get("model", {}).items() if k in ("trust_remote_code", "revision")}
        raw.pop("distill", None)  # the trained student stands alone
        raw["model"]["name_or_path"] = str(target)
        raw["tokenizer"] = {"name_or_path": str(target)}
        raw.setdefault("trainer", {})["output_dir"] = str(target)
        raw = apply_overrides(raw, overrides)
        recipe = validate(raw, str(saved))
    else:
        recipe = load_recipe(target, overrides)
    # Evaluate and predict run in one process: how a run was launched (sharding, DDP) is not theirs to repeat.
    recipe.trainer = {k: v for k, v in recipe.trainer.items() if not _launch_setting(k)} | {"report_to": "none"}
    return resolve(recipe)


LAUNCH_SETTINGS = ("fsdp", "fsdp_config", "deepspeed", "local_rank", "accelerator_config", "parallelism_config")


def _launch_setting(key: str) -> bool:
    """A TrainingArguments field that says how training is spread over processes (ddp_* included)."""
    return key in LAUNCH_SETTINGS or key.startswith("ddp_")
