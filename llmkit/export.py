"""`llmkit export`: a clean, standalone copy of a run's model (or its LoRA adapter, or both merged)."""

from __future__ import annotations

import shutil
from fnmatch import fnmatchcase
from pathlib import Path

from llmkit import modeling
from llmkit.errors import LlmkitError
from llmkit.rundir import MODEL_FILES, check_replaceable, recipe_for_evaluation
from llmkit.tasks import get_task
from llmkit.tokenizer import get_tokenizer


def export(run_dir: Path, out_dir: Path, merge: bool = False, overwrite: bool = False) -> str:
    """Write a clean, standalone copy of a run's model: the adapter as is, or (merge) base + adapter merged.

    Returns what was written: "model", "adapter" or "merged".
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    recipe = recipe_for_evaluation(run_dir, [])
    is_adapter = (run_dir / "adapter_config.json").exists()
    if merge and not is_adapter:
        raise LlmkitError(f"{run_dir} holds a full model, not a LoRA adapter: nothing to merge; drop --merge")
    if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LlmkitError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    check_replaceable(out_dir, "choose another folder to export to")
    task = get_task(recipe.task)
    tokenizer = get_tokenizer(recipe, task, None)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge:
        model = modeling.build_model(recipe, task, tokenizer, modeling.head_kwargs(task, recipe))
        model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")  # how it was trained; marks an llmkit export
        kind = "merged"
    else:
        tmp.mkdir(parents=True)
        for f in run_dir.iterdir():
            if f.is_file() and any(fnmatchcase(f.name, p) for p in (*MODEL_FILES, "recipe.yaml", "README.md")):
                shutil.copy2(f, tmp / f.name)
        if (run_dir / modeling.BASE_DIR).is_dir():
            shutil.copytree(run_dir / modeling.BASE_DIR, tmp / modeling.BASE_DIR)
        kind = "adapter" if is_adapter else "model"
    if out_dir.is_dir():  # --overwrite (checked above): the old export goes only once the new one is complete
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return kind
