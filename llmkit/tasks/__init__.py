"""The task registry: every module in llmkit/tasks/ that defines TASK, plus the `llmkit.tasks` entry points."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from llmkit.errors import RecipeError, suggest
from llmkit.tasks.base import Task

ENTRY_POINTS = "llmkit.tasks"  # a plugin package declares [project.entry-points."llmkit.tasks"] NAME = "module:TASK"
TASKS: dict[str, Task] = {}  # filled on first use: importing the task modules is not free


def _discover() -> dict[str, Task]:
    """The built-in tasks (modules here that define TASK; _private ones are helpers), then the plugins."""
    found: list[Task] = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
            if isinstance(task, Task):
                found.append(task)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        task = ep.load()
        if not isinstance(task, Task):
            raise RecipeError(f"entry point {ep.name} = {ep.value!r} ({ENTRY_POINTS}) is not a llmkit Task")
        found.append(task)
    tasks: dict[str, Task] = {}
    for task in found:
        if task.name in tasks and tasks[task.name] is not task:
            raise RecipeError(f"two tasks are named {task.name!r}; rename the plugin's task")
        tasks[task.name] = task
    return tasks


def all_tasks() -> dict[str, Task]:
    """Every registered task, by name."""
    if not TASKS:
        TASKS.update(_discover())
    return dict(TASKS)


def get_task(name: Any) -> Task:
    """Look a task up by name, with a suggestion for typos."""
    tasks = all_tasks()
    if not isinstance(name, str) or name not in tasks:  # a list or mapping from YAML is not a name either
        raise RecipeError(f"unknown task {name!r}{suggest(str(name), tasks)}; tasks: {', '.join(tasks)}")
    return tasks[name]
