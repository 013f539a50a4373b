"""Shared by the labelled tasks: label names from the recipe or the data, checked across splits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmkit.data import split_origin
from llmkit.errors import DataError


def feature_names(feature: Any) -> list[str] | None:
    """ClassLabel names of a column (or of its items, for sequences), else None."""
    inner = getattr(feature, "feature", feature)
    inner = inner[0] if isinstance(inner, list) else inner
    names = getattr(inner, "names", None)
    return list(names) if names else None


def resolve_labels(
    recipe: Any, values: dict[str, Iterable[tuple[int, Any]]], classlabel_names: list[str] | None, order: Any = sorted
) -> list[str]:
    """The label names: options.labels, else the ClassLabel names, else the labels seen in train.

    Every split's labels must be known: a label seen in validation/test but not in training
    (or not in options.labels) is a DataError naming the split, row and fix.
    """
    given = recipe.options.labels or classlabel_names
    seen: dict[str, list] = {split: list(pairs) for split, pairs in values.items()}  # (row, label)
    _check_label_types(recipe, seen)
    kinds = {type(v) for pairs in seen.values() for _, v in pairs}
    if kinds == {int} and not given:
        ids = {v for pairs in seen.values() for _, v in pairs}
        top = max(ids)
        if top >= 100 and top + 1 > 2 * len(ids):  # e.g. a label 100000000: not a class id
            split, row = next((s, r) for s, pairs in seen.items() for r, v in pairs if v == top)
            raise DataError(
                f"{split_origin(recipe, split)}, row {row}: label {top} would make {top + 1:,} classes, but only "
                f"{len(ids)} distinct labels appear; integer labels are class ids 0..N-1: renumber them, "
                "or write the labels as strings"
            )
        given = [str(i) for i in range(top + 1)]
    if given:
        names = [str(x) for x in given]
    else:
        train = [v for _, v in seen.get("train", [])]
        if not train:
            raise DataError("the training split has no labels; check data.columns")
        names = list(order(set(train)))
    known = set(names) if kinds != {int} else set(range(len(names)))
    for split, pairs in seen.items():
        for row, v in pairs:
            if v not in known:
                source = "options.labels" if recipe.options.labels else "the training data"
                fix = (
                    "add it to options.labels"
                    if recipe.options.labels
                    else "fix the row or list all labels in options.labels"
                )
                if isinstance(v, int) and v < 0:
                    fix = "unlabelled rows (e.g. a hidden test set) cannot be evaluated; drop the split"
                raise DataError(f"{split_origin(recipe, split)}, row {row}: label {v!r} is not in {source}; {fix}")
    return names


def _kind(v: Any) -> str:
    if v is None:
        return "missing"
    if isinstance(v, bool):
        return "true/false"
    return {int: "an integer", str: "a string", float: "a number with a decimal point"}.get(type(v), "other")


def _check_label_types(recipe: Any, seen: dict[str, list]) -> None:
    """Labels are all strings or all integers (class ids): say which row breaks that, where, and the fix."""
    first: tuple[str, int, Any] | None = None
    for split, pairs in seen.items():
        for row, v in pairs:
            where = f"{split_origin(recipe, split)}, row {row}"
            kind = _kind(v)
            if kind == "missing":
                raise DataError(
                    f"{where}: no label (an empty cell, a short CSV row or a null); label the row or remove it"
                )
            if kind in ("true/false", "a number with a decimal point", "other"):
                what = "a list" if isinstance(v, list) else "a mapping" if isinstance(v, dict) else kind
                hint = (
                    "; several labels per row need options.problem_type=multi_label_classification"
                    if isinstance(v, list)
                    and getattr(recipe.options, "problem_type", "") == "single_label_classification"
                    else ""
                )
                raise DataError(
                    f"{where}: label {v!r:.60} is {what}; labels must be strings or integer class ids{hint}"
                )
            if first is None:
                first = (where, v, kind)
            elif kind != first[2]:
                raise DataError(
                    f"{where}: label {v!r:.60} is {kind} but {first[0]} has {first[2]} ({first[1]!r:.60}); "
                    "use one type for all labels: all strings or all integers"
                )


def label_config(names: list[str]) -> dict:
    """The model-config kwargs of a label list: num_labels, id2label, label2id."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
