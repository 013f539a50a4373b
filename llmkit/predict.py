"""`llmkit predict`: run a trained model over a file of inputs and write one JSON line per input."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit import modeling
from llmkit.errors import LlmkitError
from llmkit.recipe import Recipe
from llmkit.tasks import get_task
from llmkit.tasks.base import INPUT_KINDS, Task
from llmkit.tokenizer import get_tokenizer


def read_inputs(path: Path) -> list[dict]:
    """Rows to predict on: JSONL/JSON (objects), CSV (header row) or TXT (one text per line)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"input file not found: {path}; pass --input path/to/inputs.jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise LlmkitError(
                            f"{path}:{lineno}: invalid JSON ({e.msg}); one JSON object per line"
                        ) from None
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".txt":
        rows = [{"text": line} for line in text.splitlines() if line.strip()]
    else:
        raise LlmkitError(f"{path}: unknown input format {suffix or '(none)'}; use .jsonl, .json, .csv, .tsv or .txt")
    if not rows:
        raise LlmkitError(f"{path}: no rows to predict on")
    if not all(isinstance(r, dict) for r in rows):
        raise LlmkitError(f"{path}: every row must be a JSON object with the input columns")
    return rows


def _previous_predictions(output: Path, inputs: Path, overwrite: bool) -> set[str] | None:
    """The fields of the first row of an existing predictions file that --overwrite may replace (None: no file).

    Only a JSON-lines file of objects qualifies (its prediction fields are checked once they are known);
    never the input file, a folder or any other file.
    """
    if not output.exists():
        return None
    if not overwrite:
        raise LlmkitError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    if output.resolve() == inputs.resolve():
        raise LlmkitError(f"--output {output} is the input file; write the predictions to another file")
    fix = "so --overwrite will not replace it; choose another --output"
    if not output.is_file():
        raise LlmkitError(f"{output} is not a file (a folder?), {fix}")
    try:
        with output.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        row = None
    if not isinstance(row, dict):
        raise LlmkitError(f"{output} is not a JSON-lines predictions file written by llmkit, {fix}")
    return set(row)


def _name_inputs(task: Task, recipe: Recipe, rows: list[dict], input_path: Path) -> None:
    """Give every row the columns the model reads, under the recipe's names.

    Each input is found under the recipe's column, else the role's own name (`document` where the recipe
    reads `article`), else, for the first input, `text` (what a .txt file gives).
    """
    for role, column in task.columns(recipe, INPUT_KINDS).items():
        accepted = list(dict.fromkeys([column, role, *(["text"] if role == task.input_role else [])]))
        for i, row in enumerate(rows, 1):
            found = next((name for name in accepted if name in row), None)
            if found is None:
                wanted = " or ".join(map(repr, accepted))
                raise LlmkitError(f"{input_path}, row {i}: needs a {wanted} column (found: {', '.join(row) or 'none'})")
            row[column] = row[found]


def predict(
    recipe: Recipe, input_path: Path, output_path: Path, overwrite: bool = False, batch_size: int | None = None
) -> int:
    """Run the recipe's model on a file of inputs and write one JSON line per input. Returns the row count."""
    task = get_task(recipe.task)
    if task.predict is None:
        raise LlmkitError(f"task {task.name!r} has no predict; use `llmkit evaluate` for its metrics")
    output_path = Path(output_path)
    previous = _previous_predictions(output_path, Path(input_path), overwrite)
    rows = read_inputs(input_path)
    _name_inputs(task, recipe, rows, input_path)
    tokenizer = get_tokenizer(recipe, task, None)
    model = modeling.build_model(recipe, task, tokenizer, modeling.head_kwargs(task, recipe))
    model.eval()
    # batch_size only when given: the task's own default otherwise (and plugin tasks written before it existed)
    outputs = task.predict(recipe, model, tokenizer, rows, **({"batch_size": batch_size} if batch_size else {}))
    if previous is not None and outputs and not set(outputs[0]) <= previous:
        raise LlmkitError(
            f"{output_path} holds no {', '.join(map(repr, outputs[0]))} predictions, so it is not llmkit's "
            "output and --overwrite will not replace it; choose another --output"
        )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row, out in zip(rows, outputs, strict=True):
            f.write(json.dumps({**row, **out}, ensure_ascii=False) + "\n")
    tmp.replace(output_path)
    return len(rows)
