"""Row rules: what makes a row unusable for a task (an empty text, words that are not a list, tags that do not
match their words), one set used by the preflight report and by data.on_bad_rows alike; and tokenizing splits."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from llmkit.data import require_columns, row_number, split_origin
from llmkit.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from llmkit.recipe import Recipe

# The kinds of column a task reads (a task's Role names one): each kind has its rules below.
TEXT, PAIR, WORDS, TAGS, LABEL, TARGET, REFERENCES = "text", "pair", "words", "tags", "label", "target", "references"
BATCH = 10_000  # rows per check

# A problem is (what, message): what is "empty" (nothing to learn from), "type" or "mismatch".
Problem = tuple[str, str]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(column: str, value: Any, required: bool) -> Problem | None:
    if value is not None and not isinstance(value, str):
        return "type", f"{column} is {value!r:.40}, not a string"
    return ("empty", f"empty {column}") if required and _blank(value) else None


def _words(column: str, value: Any) -> Problem | None:
    if value is not None and not isinstance(value, list):
        return "type", f"{column} must be a list (one per word), got {value!r:.40}"
    return None if value else ("empty", f"empty {column}")


def _tags(column: str, value: Any, words: Any) -> Problem | None:
    if value is None:  # a JSON row without the key, or with null
        return "empty", f"no {column} (one tag per word)"
    if not isinstance(value, list):
        return "type", f"{column} must be a list (one per word), got {value!r:.40}"
    if isinstance(value, list) and isinstance(words, list) and len(words) != len(value):
        return "mismatch", f"{len(words)} tokens but {len(value)} tags"
    return None


def problems(batch: dict[str, list], columns: list[tuple[str, str]]) -> list[Problem | None]:
    """Per row of a batch (column -> values), its first problem under the rules of each (kind, column), or None.

    A column the batch does not have is not checked (predict inputs carry no targets).
    """
    words = next((c for k, c in columns if k == WORDS), None)
    n = len(next(iter(batch.values()), []))
    checks = []
    for kind, column in columns:
        values = batch.get(column)
        if values is None:
            continue
        if kind in (TEXT, TARGET, PAIR):
            checks.append(lambda i, c=column, v=values, r=kind != PAIR: _text(c, v[i], r))
        elif kind == WORDS:
            checks.append(lambda i, c=column, v=values: _words(c, v[i]))
        elif kind == TAGS:
            ws = batch.get(words, [None] * n)
            checks.append(lambda i, c=column, v=values, ws=ws: _tags(c, v[i], ws[i]))
    return [next((p for check in checks if (p := check(i))), None) for i in range(n)]


_SCANS: dict[tuple, list] = {}  # (fingerprint, columns) -> problems: the preflight and the run scan a split once


def scan(ds: Dataset, columns: list[tuple[str, str]]) -> list[tuple[int, Problem]]:
    """Every row of `ds` with a problem, as (position, problem), in order (remembered by the split's fingerprint)."""
    present = [(k, c) for k, c in columns if c in ds.column_names and k not in (LABEL, REFERENCES)]
    if not present:
        return []
    key = (getattr(ds, "_fingerprint", None), tuple(present))
    if key[0] is not None and key in _SCANS:
        return _SCANS[key]
    found, offset = [], 0
    names = list(dict.fromkeys(c for _, c in present))
    for table in ds.select_columns(names).with_format("arrow").iter(batch_size=BATCH):
        suspects = _suspects(table, present)
        if suspects is None:  # a column of another type: every row through the rules
            batch, positions = ds.select_columns(names)[offset : offset + len(table)], range(len(table))
        else:  # the rules only for the rows the column-wise pass flagged
            positions = [int(i) for i in suspects]
            batch = table.take(positions).to_pydict() if positions else {}
        if positions:
            found += [(offset + i, p) for i, p in zip(positions, problems(batch, present), strict=True) if p]
        offset += len(table)
    if len(_SCANS) > 64:
        _SCANS.clear()
    if key[0] is not None:
        _SCANS[key] = found
    return found


def _suspects(table: Any, columns: list[tuple[str, str]]) -> Any:
    """Row indices that may break a rule, found column-wise with pyarrow (the rules then decide each);
    None when a column's type needs every row checked one by one (numbers where text belongs, JSON values)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = np.zeros(len(table), dtype=bool)
    words = next((c for k, c in columns if k == WORDS), None)
    for kind, column in columns:
        col = table[column]
        if kind in (TEXT, TARGET, PAIR):
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
                return None
            if kind != PAIR:
                blank = col if pa.types.is_null(col.type) else pc.equal(pc.utf8_trim_whitespace(col), "")
                mask |= pc.fill_null(blank, True).to_numpy(zero_copy_only=False).astype(bool)
        elif kind in (WORDS, TAGS):
            if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
                return None
            lengths = pc.list_value_length(col)
            if kind == WORDS:
                mask |= pc.fill_null(pc.equal(lengths, 0), True).to_numpy(zero_copy_only=False).astype(bool)
            else:
                differ = pc.not_equal(lengths, pc.list_value_length(table[words])) if words else pc.equal(lengths, -1)
                mask |= pc.fill_null(differ, True).to_numpy(zero_copy_only=False).astype(bool)
    return np.flatnonzero(mask)


def drop_bad_rows(
    recipe: Recipe, ds: Dataset, split: str, columns: list[tuple[str, str]], can_keep: bool = True
) -> Dataset:
    """Apply data.on_bad_rows to the rows that break the rules of `columns` ((kind, column) pairs).

    error: fail on the first bad row (naming split, row and fix); skip: drop them, with one warning;
    warn: keep them with one warning (dropped anyway when `can_keep` is False: they cannot be used).
    """
    bad = scan(ds, columns)
    if not bad:
        return ds
    policy = recipe.data.on_bad_rows
    first_position, (_, first_why) = bad[0]
    first_row = row_number(ds, first_position)
    where = split_origin(recipe, split)
    if policy == "error":
        more = f" ({len(bad)} bad rows in all)" if len(bad) > 1 else ""
        raise DataError(
            f"{where}, row {first_row}: {first_why}{more}; fix the data, or set data.on_bad_rows=skip to drop such rows"
        )
    log = logging.getLogger("llmkit")
    if policy == "warn" and can_keep:
        log.warning("%s: %d bad rows kept (first: row %d: %s)", where, len(bad), first_row, first_why)
        return ds
    log.warning("%s: %d bad rows dropped (first: row %d: %s)", where, len(bad), first_row, first_why)
    drop = {i for i, _ in bad}  # positions
    return ds.select([i for i in range(len(ds)) if i not in drop])


def tokenize_splits(
    recipe: Recipe, ds: DatasetDict, encode: Any, columns: dict[str, tuple[str, str]], can_keep: bool = True
) -> DatasetDict:
    """Per split: check the role columns, apply data.on_bad_rows under the row rules, then tokenize with the
    batched `encode` (cached by datasets' fingerprint), dropping the raw columns.

    Args:
        columns: role -> (kind, column) of what the task reads (Task.checked_columns).
    """
    from datasets import DatasetDict

    out = {}
    for split, data in ds.items():
        require_columns(data, {role: column for role, (_, column) in columns.items()}, split_origin(recipe, split))
        data = drop_bad_rows(recipe, data, split, list(columns.values()), can_keep=can_keep)
        out[split] = data.map(
            encode,
            batched=True,
            remove_columns=data.column_names,
            num_proc=recipe.data.num_proc,
            desc=f"Tokenizing {split}",
        )
    return DatasetDict(out)
