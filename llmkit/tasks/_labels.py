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
    kinds = {type(v) for pairs in seen.values() for _, v in pairs}
    if bool in kinds or (len(kinds) > 1 and kinds != {int}):
        raise DataError(
            f"labels of mixed types ({', '.join(sorted(k.__name__ for k in kinds))}) in the data; "
            "use all strings or all integers"
        )
    if kinds == {int} and not given:
        top = max(v for pairs in seen.values() for _, v in pairs)
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


def label_config(names: list[str]) -> dict:
    """The model-config kwargs of a label list: num_labels, id2label, label2id."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
