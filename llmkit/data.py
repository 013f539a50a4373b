"""Data loading: load_dataset wrappers, local files (incl. CoNLL), built-in corpora, splits, columns."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import DataError, first_line

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from llmkit.config import Recipe

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"valid": "validation", "dev": "validation", "val": "validation", "eval": "validation"}
_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".conll": "conll",
    ".bio": "conll",
    ".iob": "conll",
}


def cache_dir() -> Path:
    """Where llmkit keeps what it derives once and reuses (built-in corpora, trained tokenizers)."""
    root = os.environ.get("LLMKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmkit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- built-in corpora


def pydoc_corpus_file() -> Path:
    """CPython's bundled documentation (pydoc_data, ~0.5 MB of English prose), one paragraph per line."""
    import sys
    from pydoc_data.topics import topics

    path = cache_dir() / "corpora" / f"pydoc-{sys.version_info.major}.{sys.version_info.minor}.txt"
    if not path.exists():
        paragraphs = []
        for name in sorted(topics):
            for block in topics[name].split("\n\n"):
                text = " ".join(line.strip() for line in block.splitlines() if line.strip())
                if len(text) > 20:
                    paragraphs.append(text)
        atomic_write(path, "\n".join(paragraphs) + "\n")
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write a text file through a temporary name and a rename: never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- CoNLL


def read_conll(path: str) -> dict[str, list]:
    """Parse a CoNLL file: `token<whitespace>...tag` per line, blank line between sentences, -DOCSTART- skipped."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []

    def flush() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(labels))
            words.clear()
            labels.clear()

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            flush()
        elif len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'token tag', got {line.strip()!r}")
        else:
            words.append(parts[0])
            labels.append(parts[-1])
    flush()
    return {"tokens": tokens, "ner_tags": tags}


def conll_as_jsonl(path: str) -> str:
    """A JSONL copy of a CoNLL file in llmkit's cache (keyed by path, size and mtime).

    Loading it with the json builder makes the data file-backed, so tokenization is cached by
    datasets' fingerprint and every rank of a distributed run reuses the main process's work.
    """
    import hashlib
    import json

    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "conll" / f"{Path(path).stem}-{key}.jsonl"
    if not out.exists():
        rows = read_conll(path)
        lines = (
            json.dumps({"tokens": t, "ner_tags": g}) for t, g in zip(rows["tokens"], rows["ner_tags"], strict=True)
        )
        atomic_write(out, "".join(line + "\n" for line in lines))
    return str(out)


# --------------------------------------------------------------------------- loading


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _blank(path: Path) -> bool:
    """True for an empty or whitespace-only file (read at most 64 KB)."""
    with path.open("rb") as f:
        head = f.read(65536)
    return not head.strip() and path.stat().st_size <= 65536


def _local_files(recipe: Recipe) -> dict[str, list[str]]:
    files = {}
    for split in SPLITS:
        paths = _as_list(getattr(recipe.data, split))
        for p in paths:
            if Path(p).is_file() and _blank(Path(p)):
                raise DataError(f"data file is empty: {p} (data.{split}); point data.{split} at a file with rows")
            if not Path(p).is_file():
                what = "is a directory, not a file" if Path(p).is_dir() else "not found"
                raise DataError(
                    f"data file {what}: {p} (data.{split}); fix the path or override it: data.{split}=path/to/file"
                )
        if paths:
            files[split] = paths
    return files


def _format_of(files: dict[str, list[str]]) -> str:
    exts = {Path(p).suffix.lower() for paths in files.values() for p in paths}
    unknown = [e for e in exts if e not in _FORMATS]
    if unknown:
        raise DataError(
            f"unknown data file extension {unknown[0] or '(none)'}: use one of {', '.join(sorted(_FORMATS))}"
        )
    formats = {_FORMATS[e] for e in exts}
    if len(formats) > 1:
        raise DataError(f"data files mix formats ({', '.join(sorted(formats))}); use one format for all splits")
    return formats.pop()


def _load_files(files: dict[str, list[str]]) -> DatasetDict:
    from datasets import DatasetDict, load_dataset

    fmt = _format_of(files)
    if fmt == "conll":
        fmt, files = "json", {split: [conll_as_jsonl(p) for p in paths] for split, paths in files.items()}
    kwargs = {"delimiter": "\t"} if all(p.endswith(".tsv") for ps in files.values() for p in ps) else {}
    out = {}
    for split, paths in files.items():  # one split at a time: splits may differ in columns
        try:
            out[split] = load_dataset(fmt, data_files={split: paths}, split=split, **kwargs)
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas parse errors come in many types
            msg = first_line(e)
            cause = e.__cause__ or e.__context__
            if cause is not None and str(cause).strip():
                msg = f"{msg}: {first_line(cause)}"
            raise DataError(f"cannot read {fmt} data {', '.join(paths)} (data.{split}): {msg}") from None
    return DatasetDict(out)


def _load_hub(load: dict) -> DatasetDict:
    from datasets import Dataset, DatasetDict, load_dataset

    try:
        ds = load_dataset(**load)
    except TypeError as e:
        raise DataError(f"data.load: {e}") from None
    except Exception as e:  # noqa: BLE001 - network, missing-dataset and config errors differ by version
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "; offline, use local files: data.load=null data.train=path/to/train.jsonl data.validation=path/to/val.jsonl"
            if offline
            else "; check the name, or use local files: data.load=null data.train=path/to/train.jsonl"
        )
        first = first_line(e)
        raise DataError(f"cannot load dataset {load.get('path')!r}: {first}{hint}") from None
    if isinstance(ds, Dataset):
        ds = DatasetDict({"train": ds})
    if not isinstance(ds, DatasetDict):
        raise DataError("data.load must give a (map-style) dataset; streaming is not supported")
    return ds


def load_splits(recipe: Recipe, seed: int = 42) -> DatasetDict:
    """Load the recipe's data as a DatasetDict with train / validation (/ test) splits.

    A validation split is carved from train (seeded) when the data has none, and
    max_train_samples / max_eval_samples cap the splits.
    """
    from datasets import DatasetDict

    d = recipe.data
    if d.train is not None and (d.load is not None or d.source is not None):
        # `llmkit finetune recipes/classification.yaml data.train=my.csv`: the user's own training
        # file replaces the recipe's dataset (its splits are not mixed with the user's).
        import logging

        logging.getLogger("llmkit").info("data.train is given: the recipe's data.load/data.source is not used")
        ds = None
    elif d.source == "pydoc":
        ds = _load_files({"train": [str(pydoc_corpus_file())]})
    elif d.load is not None:
        ds = _load_hub(d.load)
    else:
        ds = None
    files = _local_files(recipe)
    if files:
        local = _load_files(files)
        ds = local if ds is None else DatasetDict({**ds, **local})
    ds = DatasetDict({_SPLIT_ALIASES.get(k, k): v for k, v in ds.items()})
    if "train" not in ds:
        raise DataError(
            f"the data has no train split (found: {', '.join(ds) or 'none'}); name one with data.train=path"
        )
    for split, data in ds.items():
        if len(data) == 0:
            raise DataError(f"the {split_origin(recipe, split)} is empty; point data.{split} at a file with rows")
    if "validation" not in ds and d.validation_split > 0 and len(ds["train"]) >= 2:
        parts = ds["train"].train_test_split(test_size=d.validation_split, seed=seed)
        ds["train"], ds["validation"] = parts["train"], parts["test"]
    caps = {"train": d.max_train_samples, "validation": d.max_eval_samples, "test": d.max_eval_samples}
    for split, cap in caps.items():
        if cap is not None and split in ds and len(ds[split]) > cap:
            ds[split] = ds[split].select(range(cap))
    return ds


def require_columns(ds: Dataset, needed: dict[str, str], split: str) -> None:
    """Fail with the columns found when a role's column (data.columns.ROLE) is missing."""
    for role, column in needed.items():
        if column not in ds.column_names:
            raise DataError(
                f"{split} split has no column {column!r} for {role} (columns found: {', '.join(ds.column_names)}); "
                f"set data.columns.{role}=COLUMN"
            )


def split_origin(recipe: Recipe, split: str) -> str:
    """'validation split (data/val.jsonl)': where a split's rows came from, for error messages."""
    files = _as_list(getattr(recipe.data, split, None))
    if files:
        return f"{split} split ({', '.join(files)})"
    if recipe.data.load:
        return f"{split} split of {recipe.data.load.get('path')}"
    return f"{split} split"


def drop_bad_rows(recipe: Recipe, ds: Dataset, split: str, reason_of: Any, can_keep: bool = True) -> Dataset:
    """Apply data.on_bad_rows to the rows for which `reason_of(row)` returns a reason.

    error: fail on the first bad row (naming split, row and fix); skip: drop them, with one warning;
    warn: keep them with one warning (dropped anyway when `can_keep` is False: they cannot be used).
    """
    import logging

    bad = [(i, why) for i, row in enumerate(ds) if (why := reason_of(row))]
    if not bad:
        return ds
    policy = recipe.data.on_bad_rows
    first_row, first_why = bad[0]
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
    drop = {i for i, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in drop])


def tokenize_splits(
    recipe: Recipe,
    ds: DatasetDict,
    encode: Any,
    *,
    columns: dict[str, str] | None = None,
    bad: Any = None,
    can_keep: bool = True,
) -> DatasetDict:
    """Per split: check the role columns, apply data.on_bad_rows with `bad`, then tokenize with the
    batched `encode` (cached by datasets' fingerprint), dropping the raw columns."""
    from datasets import DatasetDict

    out = {}
    for split, data in ds.items():
        if columns:
            require_columns(data, columns, split)
        if bad is not None:
            data = drop_bad_rows(recipe, data, split, bad, can_keep=can_keep)
        out[split] = data.map(
            encode,
            batched=True,
            remove_columns=data.column_names,
            num_proc=recipe.data.num_proc,
            desc=f"Tokenizing {split}",
        )
    return DatasetDict(out)
