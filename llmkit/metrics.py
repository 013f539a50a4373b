"""The one place that touches evaluate and the metric backends (scikit-learn, seqeval, rouge_score).

llmkit's metrics are `evaluate.Metric` modules computed locally, so they work offline; names in a
recipe's `metrics:` list are resolved with `evaluate.load` and need the Hub (or a local script).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmkit.errors import RecipeError, first_line
from llmkit.files import atomic_write


def classification_scores(predictions: Any, references: Any) -> dict[str, float]:
    """Accuracy (subset accuracy for multi-label indicator rows), macro/micro F1, macro precision and recall.

    sklearn's numbers (`zero_division=0`; macro over the labels that occur in either, or over every column of
    indicator rows; tested against it) computed with numpy: importing sklearn.metrics (scipy) took ~0.4 s of a
    run's first evaluation."""
    import numpy as np

    p, r = np.asarray(predictions), np.asarray(references)
    if r.ndim == 2 and r.shape[1] == 1:  # one column: sklearn reads it as single-label 0/1, not indicator rows
        p, r = p[:, 0], r[:, 0]
    if r.ndim == 2:  # multi-label indicator rows: one binary decision per column
        accuracy = float(np.all(p == r, axis=1).mean())
        tp, fp, fn = ((p == 1) & (r == 1)).sum(0), ((p == 1) & (r != 1)).sum(0), ((p != 1) & (r == 1)).sum(0)
    else:  # the labels that occur in either, as sklearn's macro average counts them
        labels, ids = np.unique(np.concatenate([p, r]), return_inverse=True)
        matrix = _confusion(ids[: len(p)], ids[len(p) :], len(labels))
        accuracy = float((p == r).mean())
        tp = np.diag(matrix)
        fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp

    def ratio(num: Any, den: Any) -> Any:
        num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    micro = ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    scores = {
        "accuracy": accuracy,
        "f1_macro": ratio(2 * tp, 2 * tp + fp + fn).mean(),
        "f1_micro": micro,
        "precision": ratio(tp, tp + fp).mean(),
        "recall": ratio(tp, tp + fn).mean(),
    }
    return {k: float(v) for k, v in scores.items()}


def confusion_counts(predictions: Any, references: Any, n_labels: int) -> list[list[int]]:
    """Single-label confusion matrix as plain lists: row = true label id, column = predicted id."""
    return _confusion(predictions, references, n_labels).tolist()


def _confusion(predictions: Any, references: Any, n_labels: int) -> Any:
    """[true id, predicted id] counts of ids in [0, n_labels) as a numpy array (pairs with an id outside: left out)."""
    import numpy as np

    p, r = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
    inside = (p >= 0) & (p < n_labels) & (r >= 0) & (r < n_labels)
    flat = np.bincount(r[inside] * n_labels + p[inside], minlength=n_labels * n_labels)
    return flat.reshape(n_labels, n_labels)


def perplexity(loss: float) -> float:
    """exp(loss), capped (a diverged run's loss would overflow)."""
    import math

    return math.exp(min(loss, 50.0))


def with_perplexity(metrics: dict, prefix: str = "eval") -> dict:
    """The metrics with {prefix}_perplexity added from {prefix}_loss (language-model tasks)."""
    loss = metrics.get(f"{prefix}_loss")
    return metrics if loss is None else {**metrics, f"{prefix}_perplexity": perplexity(loss)}


CONFUSION = "confusion_matrix.json"  # in a run folder, beside summary.json


def save_confusion(run_dir: Path, labels: list[str], matrix: list[list[int]]) -> None:
    """Keep a classification evaluation's confusion matrix in the run folder (rows: true, columns: predicted).

    Every evaluation during training replaces it, so a run ends with its final validation pass.
    A finished run (one with summary.json) is left alone: a later `llmkit evaluate RUN --split test`
    must not change what the run's plot and report show.
    """
    import json

    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        return
    atomic_write(run_dir / CONFUSION, json.dumps({"labels": list(labels), "matrix": matrix}) + "\n")


def seqeval_scores(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (CoNLL style) overall and per type, plus token accuracy."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    scores = {
        "precision": precision_score(references, predictions, zero_division=0),
        "recall": recall_score(references, predictions, zero_division=0),
        "f1": f1_score(references, predictions, zero_division=0),
        "token_accuracy": accuracy_score(references, predictions),
    }
    report = classification_report(references, predictions, output_dict=True, zero_division=0)
    for name, row in report.items():
        if not name.endswith(" avg"):
            scores[f"{name}_f1"] = row["f1-score"]
    return {k: float(v) for k, v in scores.items()}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, as rougeLsum expects (a regex: nltk's punkt data is not offline)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure x100, averaged; with several references an example scores its best."""
    from rouge_score import rouge_scorer

    kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, refs in zip(predictions, references, strict=True):
        refs = [split_sentences(r) for r in refs if r and r.strip()] or [""]
        best = scorer.score_multi(refs, split_sentences(pred))
        for k in kinds:
            totals[k] += best[k].fmeasure
    n = max(len(predictions), 1)
    return {k: 100 * v / n for k, v in totals.items()}


def _local(name: str) -> tuple[dict, Any]:
    """The features (as datasets types, by name) and function of llmkit's metric `name`."""
    return {
        "accuracy_f1": ({"predictions": "int64", "references": "int64"}, classification_scores),
        "multilabel_accuracy_f1": ({"predictions": ["int64"], "references": ["int64"]}, classification_scores),
        "seqeval": ({"predictions": ["string"], "references": ["string"]}, seqeval_scores),
        "rouge": ({"predictions": "string", "references": ["string"]}, rouge_scores),
    }[name]


def _module(name: str) -> Any:
    """llmkit's own metric `name` as an evaluate module, computed locally."""
    import evaluate
    from datasets import Features, Sequence, Value

    types, fn = _local(name)
    features = {k: Sequence(Value(t[0])) if isinstance(t, list) else Value(t) for k, t in types.items()}

    class _Local(evaluate.Metric):
        def _info(self) -> Any:
            return evaluate.MetricInfo(
                description=f"llmkit {name} (computed locally)",
                citation="",
                inputs_description="",
                features=Features(features),
            )

        def _compute(self, predictions: Any, references: Any, **kwargs: Any) -> dict:
            return fn(predictions, references, **kwargs)

    _Local.__name__ = f"llmkit_{name}"
    return _Local()


class LocalMetric:
    """One of llmkit's own evaluate modules, built at its first use.

    Importing evaluate (and the scipy it pulls in) costs ~0.3 s, which a run would otherwise pay before its
    first training step. `compute` calls the metric's function itself, as the module's `_compute` would (the
    same inputs, the same dict), so an evaluation does not pay it either; the rest of evaluate's API (`info`,
    `add_batch`, ...) builds the module.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def compute(self, *, predictions: Any, references: Any, **kwargs: Any) -> dict:
        return _local(self._name)[1](predictions, references, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # add_batch, info, ...: the rest of the evaluate module's API
        if attr.startswith("_"):  # private and dunder names (copy, pickle) are not forwarded
            raise AttributeError(attr)
        if self._module is None:
            self._module = _module(self._name)
        return getattr(self._module, attr)


LOCAL_METRICS = ("accuracy_f1", "multilabel_accuracy_f1", "seqeval", "rouge")


def load_metric(name: str) -> Any:
    """An evaluate module: llmkit's local ones (LOCAL_METRICS, built at first use), else evaluate.load."""
    if name in LOCAL_METRICS:
        return LocalMetric(name)
    import evaluate

    try:
        return evaluate.load(name)
    except Exception as e:  # noqa: BLE001 - offline, missing and broken modules fail differently
        first = first_line(e)
        raise RecipeError(
            f"metrics: cannot load {name!r} with evaluate.load ({first}); offline, remove it from the recipe's "
            f"metrics list (llmkit's built-in metrics always run) or give a local metric script path"
        ) from None


def extra_metrics(names: list[str]) -> list[Any]:
    """Load the recipe's extra `metrics:` modules up front, so a missing one fails before training."""
    return [(name, load_metric(name)) for name in names]


def compute_extra(modules: list[tuple[str, Any]], predictions: Any, references: Any) -> dict[str, float]:
    """Run the extra modules; their scalar results are prefixed with the module name."""
    out: dict[str, float] = {}
    for name, module in modules:
        result = module.compute(predictions=predictions, references=references) or {}
        for key, value in result.items():
            if isinstance(value, (int, float)):
                short = name.split("/")[-1].removesuffix(".py")  # a Hub id or a local metric script
                out[f"{short}_{key}" if key != short else key] = float(value)
    return out
