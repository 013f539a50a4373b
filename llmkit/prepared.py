"""Prepared data (`llmkit prepare`, `data.prepared: PATH`): a pretraining corpus tokenized and packed once, reused
by any number of runs and nodes.

A prepared folder holds:
  manifest.json   what made it: task, recipe, block size, the tokenizer's sha256, blocks and tokens per split
  data/           the packed splits (datasets' save_to_disk: Arrow shards, memory-mapped when a run reads them)
  tokenizer/      the tokenizer that made the blocks
  recipe.yaml     the resolved recipe that was prepared; preflight.json: its data report

A run reads the blocks as they are; it is refused (one line) when its task, block size (data.max_length) or
tokenizer differs from the manifest's, since blocks of other tokens or lengths would train silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import __version__
from llmkit.data import evaluates, token_lengths
from llmkit.errors import DataError, LlmkitError
from llmkit.files import atomic_write, write_json
from llmkit.recipefile import dump_yaml
from llmkit.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from llmkit.recipe import Recipe
    from llmkit.tasks.base import Task

MANIFEST = "manifest.json"


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what a tokenizer does to text (vocabulary, merges, normalizer, pre-tokenizer, special tokens),
    without the truncation and padding settings a call may leave on it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special_tokens"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _tokenizer_source(recipe: Recipe) -> dict:
    """How the recipe gets its tokenizer: trained (with its settings) or named."""
    t = recipe.tokenizer
    if t.train is not None and not t.name_or_path:
        return {"trained": vars(t.train)}
    return {"name_or_path": t.name_or_path or recipe.model.name_or_path}


def write(out: Path, recipe: Recipe, task: Task, tokenizer: Any, tokenized: Any, report: dict, resolved: dict) -> dict:
    """Save the packed splits, tokenizer, recipe and manifest into `out`, atomically (a partial folder is
    renamed into place when complete). Returns the manifest."""
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tokenized.save_to_disk(str(partial / "data"), max_shard_size="500MB")
        tokenizer.save_pretrained(str(partial / "tokenizer"))
        atomic_write(partial / "recipe.yaml", dump_yaml(resolved))
        write_json(partial / "preflight.json", report)
        block = recipe.data.max_length
        manifest = {
            "llmkit_version": __version__,
            "task": task.name,
            "recipe": recipe.recipe_file,
            "block_size": block,
            "tokenizer_sha256": tokenizer_hash(tokenizer),
            "tokenizer": _tokenizer_source(recipe),
            "splits": {s: {"blocks": len(d), "tokens": len(d) * block} for s, d in tokenized.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(partial / MANIFEST, manifest)
        if out.exists():  # --overwrite of an older prepared folder (checked by the caller)
            shutil.rmtree(out)
        partial.replace(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def check_output(out: Path, overwrite: bool) -> None:
    """`llmkit prepare --output OUT` never replaces a folder silently, nor anything but a prepared folder."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MANIFEST).is_file():
        raise LlmkitError(f"{out} exists and is not a prepared folder; choose another --output")
    if not overwrite:
        raise LlmkitError(
            f"{out} holds prepared data already; pass --overwrite to replace it, or choose another --output"
        )


def read_manifest(path: Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise DataError(
            f"data.prepared={path} is not a prepared folder (no {MANIFEST}); make one with "
            f"`llmkit prepare RECIPE --output {path}`"
        )
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest} is unreadable ({e}); prepare the folder again") from None


def load(recipe: Recipe, task: Task, only: str | None = None) -> tuple[Any, dict, dict]:
    """(tokenizer, {split: blocks}, the folder's preflight report) for a run with data.prepared, after checking
    that the run would have made the same blocks."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    path = Path(recipe.data.prepared)
    manifest = read_manifest(path)
    fix = "prepare again with this recipe (llmkit prepare RECIPE --output NEW), or use the folder's {}"
    if manifest["task"] != task.name:
        raise DataError(f"{path} was prepared for task {manifest['task']!r}, this recipe is {task.name!r}")
    if manifest["block_size"] != recipe.data.max_length:
        raise DataError(
            f"{path} holds blocks of {manifest['block_size']} tokens, this recipe has "
            f"data.max_length={recipe.data.max_length}; " + fix.format(f"data.max_length={manifest['block_size']}")
        )
    saved = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    source = _tokenizer_source(recipe)
    if source != manifest["tokenizer"]:
        if "trained" in source:  # the run would train its own: the folder's was trained with other settings
            raise DataError(
                f"{path} was tokenized with {manifest['tokenizer']}, this recipe trains its tokenizer with "
                f"{source['trained']}; " + fix.format("tokenizer by dropping tokenizer.train")
            )
        if tokenizer_hash(get_tokenizer(recipe, task, None)) != manifest["tokenizer_sha256"]:
            raise DataError(
                f"{path} was tokenized by another tokenizer ({manifest['tokenizer']}) than this recipe's "
                f"({source['name_or_path']}); "
                + fix.format("tokenizer: tokenizer.name_or_path=" + str(path / "tokenizer"))
            )
    data = load_from_disk(str(path / "data"))
    if only is not None and only not in data:
        raise DataError(f"{path} has no {only!r} split (splits: {', '.join(data)}); pick another --split")
    if only is None and evaluates(recipe) and "validation" not in data:
        raise DataError(f"{path} has no validation split for trainer.eval_strategy; set trainer.eval_strategy=no")
    report_file = path / "preflight.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    return saved, ({only: data[only]} if only else dict(data)), {**report, "prepared": str(path)}


def verify(path: Path) -> tuple[list[str], str | None]:
    """`llmkit check PREPARED`: the manifest against the folder (tokenizer hash, splits, block lengths); (lines to
    print, the first mismatch or None)."""
    import pyarrow.compute as pc
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    manifest = read_manifest(path)
    problems, lines = [], [f"{path}: prepared for {manifest['task']}, blocks of {manifest['block_size']} tokens"]
    if tokenizer_hash(AutoTokenizer.from_pretrained(str(path / "tokenizer"))) != manifest["tokenizer_sha256"]:
        problems.append("the tokenizer differs from the one the manifest names (sha256)")
    data = load_from_disk(str(path / "data"))
    for split, facts in manifest["splits"].items():
        if split not in data:
            problems.append(f"split {split} is missing")
            continue
        lengths = token_lengths(data[split])
        bounds = pc.min_max(lengths).as_py() if len(data[split]) else {"min": None, "max": None}
        ok = len(data[split]) == facts["blocks"] and bounds["min"] == bounds["max"] == manifest["block_size"]
        lines.append(
            f"  {split:<12} {len(data[split]):>10,} blocks {facts['tokens']:>14,} tokens  {'intact' if ok else 'DIFFERS'}"
        )
        if not ok:
            problems.append(f"split {split} has {len(data[split])} blocks of {bounds} tokens, manifest: {facts}")
    return lines, f"{path}: {problems[0]}; prepare it again" if problems else None
