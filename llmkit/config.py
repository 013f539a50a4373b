"""A recipe bound to its task: loaded and checked (the task's options too), then resolved into the Hugging
Face objects a run uses. The one place that joins the recipe schema, the tasks and the HF builders."""

from __future__ import annotations

import contextlib
from pathlib import Path

from llmkit import hf, modeling
from llmkit.data import check_load
from llmkit.errors import RecipeError, suggest
from llmkit.recipe import (
    Recipe,
    build_section,
    check_output_dir,
    default_output_dir,
    validate_sections,
)
from llmkit.recipefile import apply_overrides, find_recipe, load_raw, shipped_recipes_dir
from llmkit.tasks import all_tasks, get_task


def validate(raw: dict, source: str = "") -> Recipe:
    """Check the recipe's shape, llmkit's own keys and its task's options (fast: no heavy imports)."""
    if not isinstance(raw, dict) or "task" not in raw:
        raise RecipeError(f"{source or 'recipe'}: missing 'task:' (one of: {', '.join(all_tasks())})")
    task = get_task(raw["task"])
    recipe = validate_sections(raw, source)
    recipe.options = build_section(task.Options, recipe.options, "options")
    task.validate(recipe)
    if recipe.metrics:
        from llmkit.metrics import extra_metrics

        extra_metrics(recipe.metrics)  # fails now, not after training, when one cannot be loaded
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge (`extends:`), override and validate a recipe file (or a shipped recipe by name: recipes/bert.yaml,
    bert.yaml, bert). Heavy sections are built by `resolve`."""
    with contextlib.suppress(OSError, ValueError):  # a name no file system takes: load_raw says so in one line
        path = find_recipe(path)
    raw = default_output_dir(apply_overrides(load_raw(path), overrides or []), path)
    recipe = validate(raw, str(path))
    check_output_dir(recipe)
    hf.offline_unless_hub_resolves(recipe)  # before the Hub libraries read their offline switch at import
    return recipe


def shipped_recipe(task: str) -> Path:
    """The shipped recipe for a task (`llmkit finetune --task ner` -> recipes/ner.yaml)."""
    tasks = all_tasks()
    path = shipped_recipes_dir() / tasks[task].recipe if task in tasks else None
    if path is None or not path.is_file():
        raise RecipeError(f"no shipped recipe for task {task!r}{suggest(task, tasks)}; tasks: {', '.join(tasks)}")
    return path


def resolve(recipe: Recipe) -> Recipe:
    """Build the Hugging Face objects of the recipe (TrainingArguments, LoraConfig) and check generation:,
    model.config and data.load against the classes they go to.

    This is where a bad `trainer:`/`peft:`/`generation:`/`model.config`/`data.load` key fails, in the first
    seconds of a run, before any data is read.
    """
    task = get_task(recipe.task)
    recipe.trainer = hf.trainer_settings(recipe, task.trainer_defaults)
    recipe.args = hf.training_arguments(task.training_args_cls(), recipe.trainer)
    if recipe.model.quantization is not None:
        hf.check_quantization(recipe.model.quantization)
    if recipe.model.trust_remote_code:
        hf.warn_remote_code(recipe.model)
    if recipe.peft is not None:
        recipe.lora = hf.lora_config(recipe.peft, task.peft_task_type)
    if recipe.generation is not None:
        hf.check_generation(recipe.generation)
    modeling.check_model_config(recipe.model)
    if recipe.data.load is not None:
        check_load(recipe.data.load)
    return recipe
