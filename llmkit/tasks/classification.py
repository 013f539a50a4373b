"""Text classification: single-label or multi-label, optional text pair, dynamic padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit import unpad
from llmkit.data import column_values, require_columns, row_numbers, split_origin
from llmkit.errors import DataError, RecipeError
from llmkit.rows import LABEL, PAIR, TEXT, tokenize_splits
from llmkit.tasks._labels import feature_names, label_config, resolve_labels
from llmkit.tasks.base import SEQUENCE, Role, Task

SINGLE, MULTI = "single_label_classification", "multi_label_classification"


@dataclass
class Options:
    labels: list | None = None  # label names in id order; default: the ClassLabel names or sorted train labels
    problem_type: str = SINGLE  # or multi_label_classification (each row's label is a list)
    threshold: float = 0.5  # multi-label: a label is predicted when its probability exceeds this


def _validate(recipe: Any) -> None:
    if recipe.options.problem_type not in (SINGLE, MULTI):
        raise RecipeError(f"options.problem_type must be {SINGLE} or {MULTI}, got {recipe.options.problem_type!r}")


def _multi(recipe: Any) -> bool:
    return recipe.options.problem_type == MULTI


def _cols(recipe: Any) -> tuple[str, str | None, str]:
    pair = recipe.data.columns.get("text_pair")
    return TASK.column(recipe, "text"), pair, TASK.column(recipe, "label")


def _labels(recipe: Any, ds: Any) -> list[str]:
    text, pair, label = _cols(recipe)
    values = {}
    for split, data in ds.items():
        require_columns(
            data, {"text": text, **({"text_pair": pair} if pair else {}), "label": label}, split_origin(recipe, split)
        )
        column, rows = column_values(data, label), row_numbers(data)
        if _multi(recipe):
            bad = next((i for i, v in enumerate(column) if not isinstance(v, list)), None)
            if bad is not None:
                raise DataError(
                    f"{split_origin(recipe, split)}, row {rows[bad]}: multi-label rows need a list of labels, "
                    f"got {column[bad]!r:.60}"
                )
            values[split] = [(n, v) for n, vs in zip(rows, column, strict=True) for v in vs]
        else:
            values[split] = list(zip(rows, column, strict=True))
    return resolve_labels(recipe, values, feature_names(ds["train"].features[label]))


def _preprocess(recipe: Any, ds: Any, tokenizer: Any) -> Any:

    text, pair, label = _cols(recipe)
    names = recipe.options.labels
    index = {n: i for i, n in enumerate(names)}
    n = len(names)

    def to_id(v: Any) -> int:
        return v if isinstance(v, int) else index[str(v)]

    def strings(values: list) -> list[str]:  # bad rows kept under on_bad_rows=warn may hold None or numbers
        return [v if isinstance(v, str) else "" for v in values]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        second = strings(batch[pair]) if pair else None
        enc = tokenizer(strings(batch[text]), second, truncation=True, max_length=recipe.data.max_length)
        if label in batch:
            if _multi(recipe):
                enc["labels"] = [[1.0 if i in {to_id(v) for v in vs} else 0.0 for i in range(n)] for vs in batch[label]]
            else:
                enc["labels"] = [to_id(v) for v in batch[label]]
        return enc

    return tokenize_splits(recipe, ds, encode, TASK.checked_columns(recipe))


def _model_kwargs(recipe: Any) -> dict:
    return {**label_config(recipe.options.labels), "problem_type": recipe.options.problem_type}


def _metrics(recipe: Any, tokenizer: Any, eval_ds: Any) -> tuple[Any, Any]:
    from llmkit.metrics import compute_extra, confusion_counts, extra_metrics, load_metric, save_confusion

    multi = _multi(recipe)
    module = load_metric("multilabel_accuracy_f1" if multi else "accuracy_f1")
    extra = extra_metrics(recipe.metrics)
    threshold = recipe.options.threshold

    def reduce(logits: Any, labels: Any) -> Any:
        # Per batch: keep the decision, not the logits.
        if isinstance(logits, tuple):
            logits = logits[0]
        return (logits.sigmoid() > threshold).long() if multi else logits.argmax(-1)

    def compute(p: Any) -> dict:
        preds, refs = p.predictions, p.label_ids
        refs = refs.astype("int64")
        scores = module.compute(predictions=preds.tolist(), references=refs.tolist())
        scores.update(compute_extra(extra, preds.tolist(), refs.tolist()))  # multi-label: indicator rows
        if not multi and getattr(recipe.args, "process_index", 0) == 0:
            # Not a metric (trackers take scalars only): a file beside the run, for plots/confusion_matrix.png.
            names = recipe.options.labels
            save_confusion(recipe.output_dir, names, confusion_counts(preds.tolist(), refs.tolist(), len(names)))
        return scores

    return compute, reduce


# Sequence classifiers whose head reads the first token's final hidden state alone (BERT's pooler, the
# RoBERTa and ELECTRA heads), with BERT's layer layout: their last layer need not finish the other positions.
FIRST_TOKEN_HEADS = {
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification",
    "ElectraForSequenceClassification",
}


def last_layer_first_token_only(model: Any) -> bool:
    """Finish the last layer at the first token only: its attention output projection and feed-forward block.

    The head reads position 0 of the last hidden state and nothing else; every other position of the last
    layer feeds no output. Its attention still runs in full (position 0 attends to all), then one forward
    pre-hook on the attention's output block (dense, dropout, residual, LayerNorm) passes position 0 alone,
    so the rest of the layer works on one token per sequence: 9/12 of a layer's matmuls at the others
    skipped (12% of a 6-layer model's encoder, forward and backward). Logits, loss and gradients are the
    same; the model's code, weights and state dict are untouched. Returns whether it applied (not to other
    heads, decoders, or a chunked feed-forward; the last hidden state then has one position).
    """
    found = unpad.encoder_layers(model)
    if found is None or type(found[0]).__name__ not in FIRST_TOKEN_HEADS:
        return False
    _, encoder_model, layers = found
    block = getattr(getattr(layers[-1], "attention", None), "output", None)
    if block is None or getattr(block, "_llmkit_first_token", False):
        return block is not None
    if getattr(encoder_model, "_llmkit_skips_padding", False):  # its hooks on that block came first: not both
        return False

    def first_token(module: Any, args: tuple) -> Any:
        if len(args) == 2 and all(a.dim() == 3 for a in args):
            return tuple(a[:, :1] for a in args)
        return None

    block.register_forward_pre_hook(first_token)
    block._llmkit_first_token = True
    return True


def _speed_up(recipe: Any, model: Any) -> None:
    # Not with distillation's hidden-state loss: it compares the last hidden states at every position.
    if unpad.positions_skipped(recipe) and (recipe.distill is None or not recipe.distill.hidden_loss):
        last_layer_first_token_only(model)  # first: skip_padding leaves the layer it changed alone
    if unpad.wanted(recipe):
        unpad.skip_padding(model)


def _predict(recipe: Any, model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 32) -> list[dict]:
    import torch

    text, pair, _ = _cols(recipe)
    id2label = model.config.id2label
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        enc = tokenizer(
            [r[text] for r in batch],
            [r[pair] for r in batch] if pair else None,
            truncation=True,
            max_length=recipe.data.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            logits = model(**enc).logits.float()
        if _multi(recipe):
            probs = logits.sigmoid()
            for p in probs:
                picked = [id2label[i] for i, v in enumerate(p.tolist()) if v > recipe.options.threshold]
                out.append({"labels": picked, "scores": {id2label[i]: round(v, 4) for i, v in enumerate(p.tolist())}})
        else:
            probs = logits.softmax(-1)
            for p in probs:
                best = int(p.argmax())
                out.append({"label": id2label[best], "score": round(float(p[best]), 4)})
    return out


TASK = Task(
    name="classification",
    soft_targets=SEQUENCE,
    recipe="classification.yaml",
    main_metric="eval_accuracy",
    pipeline_tag="text-classification",
    stage="finetune",
    description="text classification (single- or multi-label, optional text pair)",
    auto_model="AutoModelForSequenceClassification",
    peft_task_type="SEQ_CLS",
    Options=Options,
    roles={"text": Role(TEXT, "text"), "text_pair": Role(PAIR), "label": Role(LABEL, "label")},
    preprocess=_preprocess,
    collator=lambda recipe, tokenizer, model: __import__("transformers").DataCollatorWithPadding(tokenizer),
    corpus=lambda recipe, train: (t for t in train[_cols(recipe)[0]] if isinstance(t, str)),
    metrics=_metrics,
    labels=_labels,
    model_kwargs=_model_kwargs,
    predict=_predict,
    validate=_validate,
    prepare_model=_speed_up,
    # Batches of similar lengths: dynamic padding then pads little (megabatches stay shuffled).
    trainer_defaults={"train_sampling_strategy": "group_by_length"},
    tokens_per_sample=False,
)
