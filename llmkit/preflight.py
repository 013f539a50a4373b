"""Data preflight: per split, what the rows hold and what is wrong with them, before a run tokenizes them."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmkit import data, rows
from llmkit.data import require_columns, row_number, split_origin
from llmkit.datafiles import FORMATS, delimiter_of
from llmkit.errors import DataError
from llmkit.files import atomic_write
from llmkit.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from llmkit.recipe import Recipe
    from llmkit.tasks import Task

log = logging.getLogger("llmkit")

BATCH = 1000  # rows per tokenizer call
SCAN_BATCH = 50_000  # rows per column-wise batch of the scan
MAX_TOKENIZED = 20_000  # rows per split tokenized (to count truncation); a larger split is sampled evenly
_INNER = ("I-", "E-")  # IOB2/BIOES tags that continue an entity: B-X or I-X of the same type must come first


# --------------------------------------------------------------------------- the report


def _no_text(value: Any) -> bool:
    return not isinstance(value, str) or not value.strip()


def _read_columns(recipe: Recipe, task: Task) -> dict[str, str]:
    """Role -> column of what every split must have (a summarization split may lack its optional references)."""
    return {r: c for r, c in task.columns(recipe).items() if task.roles[r].kind != rows.REFERENCES}


def _of_kind(task: Task, cols: dict[str, str], *kinds: str) -> list[str]:
    """The columns (of `cols`, role -> column) whose roles are of these kinds, in role order."""
    return [column for role, column in cols.items() if task.roles[role].kind in kinds]


def _is_list(column: Any) -> bool:
    return pa.types.is_list(column.type) or pa.types.is_large_list(column.type)


def _keys(table: Any, columns: list[str]) -> list[int]:
    """Per row, a hash of its input columns (token lists joined), for spotting one example in two splits."""
    parts = []
    for name in columns:
        column = table[name]
        if _is_list(column) and pa.types.is_string(column.type.value_type):
            column = pc.binary_join(column, "\x1f")
        elif not pa.types.is_string(column.type):
            column = pa.array([repr(v) for v in column.to_pylist()], pa.string())
        parts.append(column)
    joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x1e", null_handling="replace")
    return [hash(text) for text in joined.to_pylist()]


def _first_violations(tags: Any, names: list[str] | None) -> tuple[Any, tuple | None]:
    """Rows (batch indices) whose tags put I-X (or E-X) after anything but B-X or I-X, and the first such tag
    as (row, position, tag, previous tag or None). Vectorized: one pass over the flattened tags."""
    tags = tags.combine_chunks()
    encoded = pc.dictionary_encode(tags.flatten())
    values = [_name(v, names) for v in encoded.dictionary.to_pylist()] + ["O"]  # the last stands for a null tag
    codes = pc.fill_null(encoded.indices, len(values) - 1).to_numpy()
    parents = pc.list_parent_indices(tags).to_numpy()
    start = len(values)  # the code of "no previous tag" (a row's first)
    ok = np.ones((start + 1, start), dtype=bool)  # ok[previous, current]
    for j, tag in enumerate(values):
        if tag[:2] in _INNER:
            ok[:, j] = [p[:2] in ("B-", "I-") and p[2:] == tag[2:] for p in values] + [False]
    previous = np.full(len(codes), start)
    same_row = parents[1:] == parents[:-1]
    previous[1:][same_row] = codes[:-1][same_row]
    bad = np.flatnonzero(~ok[previous, codes])
    if not len(bad):
        return np.array([], dtype=int), None
    i = bad[0]
    row = int(parents[i])
    after = None if previous[i] == start else values[previous[i]]
    return np.unique(parents[bad]), (row, int(i - np.searchsorted(parents, row)), values[codes[i]], after)


def _label_names(recipe: Recipe, data: Dataset, label: str | None) -> list[str] | None:
    """Names for integer labels: options.labels (set by the task's labels()), else the ClassLabel names."""
    if label is None:
        return None
    from llmkit.tasks._labels import feature_names

    given = getattr(recipe.options, "labels", None)
    return [str(n) for n in given] if given else feature_names(data.features[label])


def _name(value: Any, names: list[str] | None) -> str:
    return names[value] if names and isinstance(value, int) and 0 <= value < len(names) else str(value)


def _sample(data: Dataset) -> Dataset:
    if len(data) <= MAX_TOKENIZED:
        return data
    step = -(-len(data) // MAX_TOKENIZED)
    return data.select(range(0, len(data), step))


def _lengths(tokenizer: Any, texts: list, pairs: list | None = None, words: bool = False, target: bool = False) -> list:
    kwargs = {"return_attention_mask": False, "return_token_type_ids": False, "return_length": True, "verbose": False}
    if not texts:
        return []
    if target:
        return tokenizer(text_target=texts, **kwargs)["length"]
    return tokenizer(texts, pairs, is_split_into_words=words, **kwargs)["length"]


def _token_facts(recipe: Recipe, task: Task, data: Dataset, cols: dict[str, str], tokenizer: Any) -> dict:
    """Tokenized lengths (of an even sample of large splits): truncation against data.max_length
    (max_target_length for targets), or, for the packed pretraining tasks, tokens per document."""
    sample = _sample(data)
    source = cols[task.input_role]
    pair = next(iter(_of_kind(task, cols, rows.PAIR)), None)
    target = next(iter(_of_kind(task, cols, rows.TARGET)), None)
    words = task.roles[task.input_role].kind == rows.WORDS
    prefix = getattr(recipe.options, "source_prefix", "") or ""
    usable = (lambda v: isinstance(v, list) and v) if words else (lambda v: not _no_text(v))  # bad rows are left out
    sources: list[int] = []
    targets: list[int] = []
    for batch in sample.select_columns([c for c in (source, pair, target) if c]).iter(batch_size=BATCH):
        keep = [i for i, v in enumerate(batch[source]) if usable(v)]
        texts = [batch[source][i] for i in keep]
        if words:
            sources += _lengths(tokenizer, [[str(w) for w in ws] for ws in texts], words=True)
        else:
            pairs = [v if isinstance(v, str) else "" for v in (batch[pair][i] for i in keep)] if pair else None
            sources += _lengths(tokenizer, [prefix + t for t in texts], pairs)
        if target:
            targets += _lengths(tokenizer, [t for t in batch[target] if not _no_text(t)], target=True)
    facts: dict[str, Any] = {"tokenized_rows": len(sample)}
    if task.tokens_per_sample:  # packed into blocks: nothing is truncated
        per_document = sum(sources) / max(1, len(sources))
        return {**facts, "tokens_per_document": round(per_document, 1)}
    over = sum(n > recipe.data.max_length for n in sources)
    facts.update(truncated=over, truncated_share=round(over / max(1, len(sources)), 4), longest=max(sources or [0]))
    if target:
        over = sum(n > recipe.data.max_target_length for n in targets)
        facts.update(truncated_targets=over, truncated_targets_share=round(over / max(1, len(targets)), 4))
        facts["longest_target"] = max(targets or [0])
    return facts


def _scan(recipe: Recipe, task: Task, data: Dataset, cols: dict[str, str]) -> tuple[dict, list[int]]:
    """One pass over a split: the row rules (the run's own, from rows.py), label counts, NER tag-scheme checks;
    and the keys of its non-empty rows."""
    inputs = _of_kind(task, cols, rows.TEXT, rows.PAIR, rows.WORDS)
    label = next(iter(_of_kind(task, cols, rows.LABEL, rows.TAGS)), None)
    tags = next(iter(_of_kind(task, cols, rows.TAGS)), None)
    names = _label_names(recipe, data, label)
    problems = dict(rows.scan(data, list(task.checked_columns(recipe).values())))  # row -> (what, message)
    empty = {i for i, (what, _) in problems.items() if what == "empty"}
    facts: dict[str, Any] = {"rows": len(data), "empty_rows": len(empty)}
    if not task.tokens_per_sample:  # the fine-tuning tasks apply data.on_bad_rows; packing drops empty texts
        first = next(iter(problems.items()), None)
        first_row = first and {"row": row_number(data, first[0]), "problem": first[1][1]}
        facts.update(bad_rows=len(problems), first_bad_row=first_row)
    else:
        facts["dropped_rows"] = len(problems)
    if tags:
        mismatches = sum(what == "mismatch" for what, _ in problems.values())
        facts.update(length_mismatches=mismatches, tag_scheme_violations=0, first_tag_scheme_violation=None)
    counts: Counter = Counter()
    keys: list[int] = []  # of the non-empty rows
    offset = 0
    for table in data.select_columns(list(dict.fromkeys(cols.values()))).with_format("arrow").iter(SCAN_BATCH):
        keys += (k for i, k in enumerate(_keys(table, inputs)) if offset + i not in empty)
        if tags and _is_list(table[tags]):
            violating, first_violation = _first_violations(table[tags], names)
            facts["tag_scheme_violations"] += len(violating)
            if first_violation and facts["first_tag_scheme_violation"] is None:
                row, token, tag, after = first_violation
                where = {"row": row_number(data, offset + row), "token": token, "tag": tag, "after": after}
                facts["first_tag_scheme_violation"] = where
        if label:
            column = table[label]
            counted = pc.value_counts(pc.list_flatten(column) if _is_list(column) else column)
            for value, n in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True):
                if value is not None:
                    counts[_name(value, names)] += n
        offset += len(table)
    if label:
        facts["label_counts"] = dict(counts.most_common())
    return facts, keys


def build_report(recipe: Recipe, task: Task, raw: DatasetDict, tokenizer: Any) -> dict:
    """The preflight report of `raw` (as load_data returns it: every role column present): a JSON-able dict,
    nothing raised or logged for problems in the rows (enforce() does that)."""
    cols = _read_columns(recipe, task)
    report: dict[str, Any] = {
        "recipe": recipe.recipe_file,
        "task": task.name,
        "on_bad_rows": recipe.data.on_bad_rows,
        "max_length": recipe.data.max_length,
        **({"max_target_length": recipe.data.max_target_length} if _of_kind(task, cols, rows.TARGET) else {}),
        "splits": {},
        "warnings": [],
    }
    warn = report["warnings"].append
    train_keys: set[int] = set()
    for split in sorted(raw, key=lambda s: s != "train"):  # train first: the other splits are compared to it
        data, where = raw[split], split_origin(recipe, split)  # its columns were checked by load_data
        facts, keys = _scan(recipe, task, data, cols)
        facts = {
            "source": where,
            **_separator(recipe, split),
            **facts,
            **_token_facts(recipe, task, data, cols, tokenizer),
        }
        if "tokens_per_document" in facts:
            facts["documents"] = facts["rows"] - facts["dropped_rows"]
            facts["tokens"] = round(facts["tokens_per_document"] * facts["documents"])
            facts["approx_blocks"] = facts["tokens"] // recipe.data.max_length
        if split == "train":
            train_keys = set(keys)
        else:
            facts["duplicates_of_train"] = sum(k in train_keys for k in keys)
            if facts["duplicates_of_train"]:
                warn(
                    f"{where}: {facts['duplicates_of_train']} rows are also in the training data; "
                    "scores on it overstate how well the model generalizes (remove them from one split)"
                )
            if "label_counts" in facts:
                seen = report["splits"]["train"].get("label_counts", {})
                facts["unseen_labels"] = [name for name in facts["label_counts"] if name not in seen]
                if facts["unseen_labels"]:
                    shown = ", ".join(f"{n} ({facts['label_counts'][n]})" for n in facts["unseen_labels"][:10])
                    warn(f"{where}: labels never seen in training: {shown}; the model cannot learn to predict them")
        report["splits"][split] = facts
        report["warnings"] += _shape_warnings(recipe, where, facts)
    return report


def _separator(recipe: Recipe, split: str) -> dict:
    """{"delimiter": ...} for a split read from .csv/.tsv files (the separator found in them), else {}."""
    files = [f for f in recipe.data.files(split) if FORMATS.get(Path(f).suffix.lower()) == "csv"]
    return {"delimiter": delimiter_of(files[0])} if files and Path(files[0]).is_file() else {}


def _shape_warnings(recipe: Recipe, where: str, facts: dict) -> list[str]:
    """A split's warnings about tag schemes and truncation."""
    warnings = []
    if facts.get("tag_scheme_violations"):
        v = facts["first_tag_scheme_violation"]
        warnings.append(
            f"{where}: {facts['tag_scheme_violations']} rows have an I- tag without a B- of its type before it "
            f"(first: row {v['row']}, token {v['token']}: {v['tag']} after {v['after'] or 'the start'}); "
            "seqeval reads it as a new entity: check the data is IOB2"
        )
    sampled = " sampled" if facts.get("tokenized_rows", facts["rows"]) < facts["rows"] else ""
    if facts.get("truncated"):
        warnings.append(
            f"{where}: {facts['truncated_share']:.1%} of examples ({facts['truncated']:,} of "
            f"{facts['tokenized_rows']:,}{sampled} rows) are longer than data.max_length={recipe.data.max_length} "
            f"tokens (longest: {facts['longest']}) and get truncated; raise data.max_length to keep them whole"
        )
    if facts.get("truncated_targets"):
        warnings.append(
            f"{where}: {facts['truncated_targets_share']:.1%} of targets ({facts['truncated_targets']:,} of "
            f"{facts['tokenized_rows']:,}{sampled} rows) are longer than data.max_target_length="
            f"{recipe.data.max_target_length} tokens (longest: {facts['longest_target']}) and get truncated"
        )
    return warnings


def enforce(recipe: Recipe, task: Task, raw: DatasetDict, report: dict) -> None:
    """Log the report's warnings; under data.on_bad_rows=error, fail on the first bad row.

    The failure is the run's own, word for word: the same rules (rows.py) through the same
    rows.drop_bad_rows that the task's preprocess applies, before anything is tokenized. Under
    skip/warn nothing happens here: the run's preprocess drops or keeps the rows and says so.
    """
    for message in report["warnings"]:
        log.warning("%s", message)
    if recipe.data.on_bad_rows == "error":
        columns = list(task.checked_columns(recipe).values())
        for split, facts in report["splits"].items():
            if facts.get("bad_rows"):
                rows.drop_bad_rows(recipe, raw[split], split, columns)


def preflight(recipe: Recipe, task: Task, raw: DatasetDict, tokenizer: Any) -> dict:
    """Check the loaded splits before tokenizing: build the report, log its warnings, apply data.on_bad_rows.

    Call it after task.labels() has set options.labels (it names integer labels with them).

    Returns:
        The report (see build_report); save it with save_report.

    Raises:
        DataError: data.on_bad_rows is `error` and a split has a bad row (or a role's column is missing).
    """
    report = build_report(recipe, task, raw, tokenizer)
    enforce(recipe, task, raw, report)
    if task.tokens_per_sample:  # a corpus: its empty lines are paragraph breaks, dropped (not data.on_bad_rows)
        for facts in report["splits"].values():
            if facts["dropped_rows"]:
                log.info("%s: %d empty or non-text lines dropped", facts["source"], facts["dropped_rows"])
    return report


# --------------------------------------------------------------------------- `llmkit check`


def load_data(recipe: Recipe, task: Task, strict: bool = True, need: str | None = None) -> tuple[DatasetDict, Any]:
    """The raw splits (labels resolved into options.labels) and the tokenizer, as every run and `check` get them.

    A run is strict: a label of any split that training never saw is a DataError. `check` is not
    (strict=False): the labels come from the training split, and the report counts the unseen ones.
    `need` names a split that must exist (`evaluate --split`), checked before any other work.
    """
    from datasets import DatasetDict

    raw = data.load_splits(recipe, seed=recipe.args.seed if recipe.args is not None else 42)
    if need is not None and need not in raw:
        raise DataError(
            f"the data has no {need!r} split (splits: {', '.join(raw)}); "
            f"name it with data.{need}=path/to/file or pick another --split"
        )
    for split, part in raw.items():  # before anything reads a column (the tokenizer's training corpus does)
        require_columns(part, _read_columns(recipe, task), split_origin(recipe, split))
    labels = task.labels(recipe, raw if strict else DatasetDict(train=raw["train"])) if task.labels else None
    if labels is not None:
        recipe.options.labels = labels
    return raw, get_tokenizer(recipe, task, raw["train"])


def default_path(recipe: Recipe) -> Path | None:
    """<output_dir>/preflight.json when the run folder exists (check never creates one), else None."""
    return recipe.output_dir / "preflight.json" if recipe.output_dir.is_dir() else None


def save_report(report: dict, path: Path) -> None:
    """Write the report as JSON (atomically)."""
    atomic_write(Path(path), json.dumps(report, indent=2) + "\n")


_LINES = [  # (key in a split's facts, what the table calls it)
    ("rows", "rows"),
    ("empty_rows", "empty rows"),
    ("bad_rows", "bad rows"),
    ("duplicates_of_train", "duplicates of train"),
    ("length_mismatches", "token/tag count mismatches"),
    ("tag_scheme_violations", "I- without B- (rows)"),
    ("truncated", "over max_length"),
    ("longest", "longest (tokens)"),
    ("truncated_targets", "targets over max_target_length"),
    ("longest_target", "longest target (tokens)"),
    ("documents", "documents"),
    ("tokens_per_document", "tokens per document"),
    ("tokens", "tokens"),
    ("approx_blocks", "blocks of max_length (approx.)"),
]


def _cell(facts: dict, key: str) -> str:
    value = facts.get(key)
    if isinstance(value, float):
        return f"{value:,.1f}"
    if not isinstance(value, int):
        return "-"
    share = facts.get(f"{key}_share")
    return f"{value:,} ({share:.0%})" if value and share is not None else f"{value:,}"


def format_report(report: dict) -> str:
    """The report as a plain-text table (one column per split), then labels and first bad rows."""
    splits = report["splits"]
    width = max(14, *(len(s) + 2 for s in splits))
    head = f"Data preflight ({report['task']}): on_bad_rows={report['on_bad_rows']}, max_length={report['max_length']}"
    if "max_target_length" in report:
        head += f", max_target_length={report['max_target_length']}"
    lines = [head, " " * 32 + "".join(f"{s:>{width}}" for s in splits)]
    for key, name in _LINES:
        if any(key in f for f in splits.values()):
            lines.append(f"  {name:<30}" + "".join(f"{_cell(f, key):>{width}}" for f in splits.values()))
    for split, f in splits.items():
        if f.get("tokenized_rows", f["rows"]) < f["rows"]:
            lines.append(f"  {split}: token counts from an even sample of {f['tokenized_rows']:,} rows")
        if f.get("label_counts"):
            total = sum(f["label_counts"].values())
            top = [f"{n} {c:,} ({c / total:.0%})" for n, c in list(f["label_counts"].items())[:8]]
            more = f", +{len(f['label_counts']) - 8} more" if len(f["label_counts"]) > 8 else ""
            lines.append(f"  labels in {split}: {', '.join(top)}{more}")
        if f.get("unseen_labels"):
            lines.append(f"  labels in {split} never seen in train: {', '.join(f['unseen_labels'])}")
        if f.get("delimiter"):
            lines.append(f"  {split}: fields separated by {f['delimiter']!r}")
        if f.get("first_bad_row"):
            b = f["first_bad_row"]
            lines.append(f"  first bad row in {split}: row {b['row']}: {b['problem']}")
    return "\n".join(lines)
