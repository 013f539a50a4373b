"""Data loading: load_dataset (Hub, local files, built-in corpora), splits, columns; data.load checked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.datafiles import check_file, conll_as_jsonl, delimiter_of, format_of, read_error
from llmkit.errors import DataError, first_line, show, suggest
from llmkit.files import atomic_write, cache_dir

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from llmkit.recipe import Recipe

SPLITS = ("train", "validation", "test")
ROW = "__row__"  # the column that keeps each row's number in its source file (removed before tokenizing)
_SPLIT_ALIASES = {"valid": "validation", "dev": "validation", "val": "validation", "eval": "validation"}
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


# --------------------------------------------------------------------------- loading


def _blank(path: Path) -> bool:
    """True for an empty or whitespace-only file (read at most 64 KB)."""
    with path.open("rb") as f:
        head = f.read(65536)
    return not head.strip() and path.stat().st_size <= 65536


def _local_files(recipe: Recipe) -> dict[str, list[str]]:
    files = {}
    for split in SPLITS:
        paths = recipe.data.files(split)
        for p in paths:
            if Path(p).is_file() and _blank(Path(p)):
                raise DataError(f"data file is empty: {p} (data.{split}); point data.{split} at a file with rows")
            if not Path(p).is_file():
                what = "is a directory, not a file" if Path(p).is_dir() else "not found"
                fix = f"fix the path or override it: data.{split}=path/to/file"
                if Path(p).parts[:2] == ("tests", "fixtures"):  # the shipped tiny recipes' data
                    fix = "the tiny recipes read the fixtures in the llmkit repository's tests/ folder: run them from a clone's root"
                raise DataError(f"data file {what}: {p} (data.{split}); {fix}")
        if paths:
            files[split] = paths
    return files


class _NoReadErrorLog:
    """Drops datasets' "Failed to read/load ..." log lines: the DataError raised instead says it in one line."""

    @staticmethod
    def filter(record: Any) -> bool:
        return not str(record.msg).startswith(("Failed to read file", "Failed to load JSON", "Failed to convert"))


def _load_files(files: dict[str, list[str]], streaming: bool = False) -> DatasetDict:
    import logging

    from datasets import DatasetDict, load_dataset

    for name in ("csv.csv", "json.json", "text.text", "parquet.parquet"):
        log = logging.getLogger(f"datasets.packaged_modules.{name}")
        if not any(isinstance(f, _NoReadErrorLog) for f in log.filters):
            log.addFilter(_NoReadErrorLog())
    out = {}
    for split, paths in files.items():  # one split at a time: splits may differ in columns and formats
        fmt = format_of(split, paths)
        for p in paths:
            check_file(p, split, fmt)
        if fmt == "conll":
            fmt, paths = "json", [conll_as_jsonl(p) for p in paths]
        kwargs: dict[str, Any] = {}
        if fmt in ("text", "json", "csv"):
            # utf-8-sig: a BOM (Excel's "CSV UTF-8") is not part of the first column's name; for JSON it also
            # makes the loader decode strictly, so bytes that are not UTF-8 fail here and not in tokenization.
            kwargs["encoding"] = "utf-8-sig"
        if fmt == "csv":
            delimiters = {delimiter_of(p) for p in paths}
            if len(delimiters) > 1:
                shown = ", ".join(sorted(map(repr, delimiters)))
                raise DataError(f"data.{split} files use different separators ({shown}); use one per split")
            kwargs["delimiter"] = delimiters.pop()
        try:
            out[split] = load_dataset(fmt, data_files={split: paths}, split=split, streaming=streaming, **kwargs)
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas parse errors come in many types
            raise read_error(fmt, paths, split, e) from None
    return out if streaming else DatasetDict(out)


def check_load(load: dict) -> None:
    """data.load before anything is read: a `path`, and no misspelt load_dataset argument.

    load_dataset passes keys it does not know to the dataset's builder config (`field` for json,
    `sep` for csv): those are checked for llmkit's local builders (json, csv, text, parquet) and left to
    the dataset for Hub ones, except a key that is a near miss of a load_dataset argument (`splt`).
    """
    import difflib
    import inspect

    from datasets import load_dataset

    if not isinstance(load.get("path"), str) or not load["path"].strip():
        raise DataError("data.load needs a path: a Hub dataset id or a builder (json, csv, text, parquet)")
    known = set(inspect.signature(load_dataset).parameters) - {"config_kwargs"}
    builder = _builder_config_fields(load["path"])
    for key in load:
        if key in known or (builder is not None and key in builder):
            continue
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if builder is not None or near:
            valid = known | (builder or set())
            raise DataError(
                f"unknown key {show(f'data.load.{key}')}{suggest(str(key), valid)} (not a load_dataset argument)"
            )


def _builder_config_fields(path: str) -> set[str] | None:
    """The config fields of one of datasets' packaged builders (json, csv, ...), or None for anything else."""
    import dataclasses
    import importlib

    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if path not in _PACKAGED_DATASETS_MODULES:
        return None
    module = importlib.import_module(_PACKAGED_DATASETS_MODULES[path][0])
    config_class = getattr(
        getattr(module, next((n for n in dir(module) if n.lower() == path.lower()), ""), None),
        "BUILDER_CONFIG_CLASS",
        None,
    )
    return {f.name for f in dataclasses.fields(config_class)} if config_class else set()


def _load_hub(load: dict, streaming: bool = False) -> DatasetDict:
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset

    try:
        ds = load_dataset(**load, **({"streaming": True} if streaming else {}))
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
    if isinstance(ds, (Dataset, IterableDataset)):
        ds = {"train": ds} if streaming else DatasetDict({"train": ds})
    if streaming:
        return dict(ds)
    if not isinstance(ds, DatasetDict):
        raise DataError(
            "data.load must give a map-style dataset; to stream a corpus set data.streaming=true, not data.load.streaming"
        )
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
    # Every row keeps its number in its source (1-based data row; a CSV header is not a row), whatever
    # carving, capping or shuffling follows: error messages name the row a user can find.
    ds = DatasetDict({split: data.add_column(ROW, list(range(1, len(data) + 1))) for split, data in ds.items()})
    if "validation" not in ds and d.validation_split > 0 and len(ds["train"]) >= 2:
        parts = ds["train"].train_test_split(test_size=d.validation_split, seed=seed)
        ds["train"], ds["validation"] = parts["train"], parts["test"]
    if "validation" not in ds and evaluates(recipe):
        # The Trainer would stop on this only after the model is built, with a ValueError (exit 1).
        n = len(ds["train"])
        why = (
            "data.validation_split=0 carves none"
            if d.validation_split == 0
            else f"{n} row is too few to carve one (data.validation_split={d.validation_split})"
        )
        raise DataError(
            f"trainer.eval_strategy={recipe.trainer['eval_strategy']} needs a validation split, and the "
            f"{split_origin(recipe, 'train')} has none: {why}; give data.validation=FILE, add rows, "
            "or set trainer.eval_strategy=no"
        )
    caps = {"train": d.max_train_samples, "validation": d.max_eval_samples, "test": d.max_eval_samples}
    for split, cap in caps.items():
        if cap is not None and split in ds and len(ds[split]) > cap:
            ds[split] = ds[split].select(range(cap))
    return ds


def is_stream(ds: Any) -> bool:
    """A datasets IterableDataset (a stream, data.streaming): no length, read in order."""
    return ds is not None and not hasattr(ds, "__len__")


def evaluates(recipe: Recipe) -> bool:
    """Whether the recipe's trainer.eval_strategy evaluates during training (and so needs a validation split)."""
    return str(recipe.trainer.get("eval_strategy", "no")).lower() not in ("no", "intervalstrategy.no")


def load_streams(recipe: Recipe) -> dict[str, Any]:
    """The recipe's splits as streams (datasets IterableDataset, data.streaming): nothing is read but the first
    bytes of each local file (checked as for a run in memory)."""
    d = recipe.data
    streams: dict[str, Any] = {}
    if d.train is None and d.source == "pydoc":
        streams = _load_files({"train": [str(pydoc_corpus_file())]}, streaming=True)
    elif d.train is None and d.load is not None:
        streams = _load_hub(d.load, streaming=True)
    streams.update(_load_files(_local_files(recipe), streaming=True))
    streams = {_SPLIT_ALIASES.get(k, k): v for k, v in streams.items()}
    if "train" not in streams:
        raise DataError(
            f"the data has no train split (found: {', '.join(streams) or 'none'}); name one with data.train=path"
        )
    return streams


def identity(recipe: Recipe) -> dict:
    """What names a recipe's corpus without reading it (a stream has no fingerprint): its local files with their
    sizes and modification times, or its data.load / data.source."""
    files = {}
    for split in SPLITS:
        for p in recipe.data.files(split):
            st = Path(p).stat() if Path(p).is_file() else None
            files[p] = [st.st_size, st.st_mtime_ns] if st else None
    return {"files": files, "load": recipe.data.load, "source": recipe.data.source}


def row_number(ds: Dataset, position: int) -> int:
    """The source row number (1-based) of the row at `position` of a split (its position + 1 if it has none)."""
    return ds[position][ROW] if ROW in ds.column_names else position + 1


def row_numbers(ds: Dataset) -> list[int]:
    """The source row numbers (1-based) of every row of a split, in order."""
    return column_values(ds, ROW) if ROW in ds.column_names else list(range(1, len(ds) + 1))


def column_values(ds: Dataset, name: str) -> list:
    """A column's values as a list, read at once: datasets 5's `ds[name]` is a lazy column that iterates (and
    indexes) row by row, 0.61 s for SST-2's 67,349 labels against 0.002 s for the slice."""
    return ds[name][:]


def token_lengths(ds: Dataset, column: str = "input_ids") -> Any:
    """Each row's length of a list column as an Arrow array, read in one pass (respecting a selection or shuffle),
    or None where the column is missing or not a list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in (ds.column_names or []):
        return None
    values = ds.with_format("arrow")[:][column]
    if not pa.types.is_list(values.type) and not pa.types.is_large_list(values.type):
        return None
    return pc.list_value_length(values)


class GroupsByLengthFast:
    """Trainer mixin: `train_sampling_strategy: group_by_length` with each row's token count read by Arrow in one
    pass; the Trainer's own sampler reads every row in Python to measure it (0.8 s for 20,000 SST-2 rows, growing
    with the data). The same LengthGroupedSampler, so the same batches; anything else goes to the Trainer."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        from datasets import Dataset as ArrowDataset
        from transformers.trainer_pt_utils import LengthGroupedSampler

        data = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        if args.train_sampling_strategy != "group_by_length" or not isinstance(data, ArrowDataset):
            return super()._get_train_sampler(train_dataset)
        if args.length_column_name in data.column_names:
            return super()._get_train_sampler(train_dataset)
        names = getattr(self.processing_class, "model_input_names", None) or ["input_ids"]
        lengths = token_lengths(data, names[0])
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        batch = args.train_batch_size * args.gradient_accumulation_steps
        return LengthGroupedSampler(batch, lengths=lengths.to_pylist())


def columns_of(ds: Any) -> list[str]:
    """A split's column names; a stream whose files do not declare them (text, JSON lines) shows its first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds), {}).keys())  # not ds.take(1): on a process's part of a stream it may be empty


def require_columns(ds: Dataset, needed: dict[str, str], where: str) -> None:
    """Fail with the columns found when a role's column (data.columns.ROLE) is missing from `where` (a split,
    named with its files by split_origin; a map-style split or a stream)."""
    names = columns_of(ds)
    shown = [c for c in names if c != ROW]
    for role, column in needed.items():
        if column not in names:
            raise DataError(
                f"{where} has no column {column!r} for {role} (columns found: {', '.join(shown)}); "
                f"set data.columns.{role}=COLUMN"
            )


def split_origin(recipe: Recipe, split: str) -> str:
    """'validation split (data/val.jsonl)': where a split's rows came from, for error messages."""
    files = recipe.data.files(split)
    if files:
        return f"{split} split ({', '.join(files)})"
    if split == "validation" and recipe.data.train is not None and recipe.data.validation_split > 0:
        return f"validation split (carved from data.train {', '.join(recipe.data.files('train'))})"
    if recipe.data.load:
        return f"{split} split of {recipe.data.load.get('path')}"
    return f"{split} split"
