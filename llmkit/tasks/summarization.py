"""Summarization (seq2seq): T5/BART-style models or an encoder-decoder warm-started from two encoders."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmkit.data import column_values
from llmkit.rows import REFERENCES, TARGET, TEXT, tokenize_splits
from llmkit.tasks.base import Role, Task


@dataclass
class Options:
    source_prefix: str = ""  # prepended to every document (T5 was trained with "summarize: ")


def _cols(recipe: Any) -> tuple[str, str, str | None]:
    return TASK.column(recipe, "document"), TASK.column(recipe, "summary"), recipe.data.columns.get("references")


def _preprocess(recipe: Any, ds: Any, tokenizer: Any) -> Any:

    doc, summ, refs = _cols(recipe)
    prefix = recipe.options.source_prefix

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer([prefix + d for d in batch[doc]], truncation=True, max_length=recipe.data.max_length)
        if summ in batch:
            enc["labels"] = tokenizer(
                text_target=batch[summ], truncation=True, max_length=recipe.data.max_target_length
            )["input_ids"]
            # Kept for the metric (several references per example score their best); the Trainer
            # drops this column before batching.
            enc["references"] = batch[refs] if refs and refs in batch else [[s] for s in batch[summ]]
        return enc

    return tokenize_splits(recipe, ds, encode, TASK.checked_columns(recipe), can_keep=False)


def _collator(recipe: Any, tokenizer: Any, model: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)

    def collate(features: list[dict]) -> dict:
        # The decoder input begins with its start token; a target that begins with the same token
        # (a BERT tokenizer's [CLS] in bert2bert) would teach it to repeat that token forever.
        if start is not None:
            features = [
                {**f, "labels": f["labels"][1:]} if f.get("labels") and f["labels"][0] == start else f for f in features
            ]
        return pad(features)

    return collate


def _corpus(recipe: Any, train: Any) -> Any:
    """The documents, then the summaries, read 1,000 rows at a time (a lazy column would read them one by one)."""
    for column in _cols(recipe)[:2]:
        for batch in train.select_columns([column]).iter(batch_size=1000):
            yield from (t for t in batch[column] if isinstance(t, str))


def _metrics(recipe: Any, tokenizer: Any, eval_ds: Any) -> tuple[Any, Any]:
    import numpy as np

    from llmkit.metrics import compute_extra, extra_metrics, load_metric

    module = load_metric("rouge")
    extra = extra_metrics(recipe.metrics)
    has = eval_ds is not None and "references" in eval_ds.column_names
    references = column_values(eval_ds, "references") if has else None

    def compute(p: Any) -> dict:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        texts = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = references
        if refs is None or len(refs) != len(texts):
            labels = np.where(p.label_ids < 0, tokenizer.pad_token_id, p.label_ids)
            refs = [[t.strip()] for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        scores = module.compute(predictions=texts, references=refs)
        scores["gen_len"] = float(np.mean([np.count_nonzero(row != tokenizer.pad_token_id) for row in preds]))
        scores.update(compute_extra(extra, texts, [r[0] for r in refs]))
        return scores

    return compute, None


def lead_sentence(document: str) -> str:
    """The lead baseline: a document's first sentence."""
    return re.split(r"(?<=[.!?])\s+", document.strip(), maxsplit=1)[0]


def generate(model: Any, tokenizer: Any, documents: list[str], recipe: Any, batch_size: int = 16) -> list[str]:
    """Batched generation with the recipe's generation settings."""
    import torch

    prefix = recipe.options.source_prefix
    out = []
    model.eval()
    for start in range(0, len(documents), batch_size):
        enc = tokenizer(
            [prefix + d for d in documents[start : start + batch_size]],
            truncation=True,
            max_length=recipe.data.max_length,
            padding=True,
            return_tensors="pt",
        )
        enc.pop("token_type_ids", None)
        with torch.no_grad():
            ids = model.generate(**enc.to(model.device), generation_config=model.generation_config)
        out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


def _predict(recipe: Any, model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 16) -> list[dict]:
    doc, _, _ = _cols(recipe)
    return [{"summary": s} for s in generate(model, tokenizer, [r[doc] for r in rows], recipe, batch_size)]


TASK = Task(
    name="summarization",
    recipe="summarization.yaml",
    main_metric="eval_rougeL",
    pipeline_tag="summarization",
    stage="finetune",
    description="summarization (seq2seq) with ROUGE, generation in eval and predict",
    auto_model="AutoModelForSeq2SeqLM",
    peft_task_type="SEQ_2_SEQ_LM",
    Options=Options,
    roles={"document": Role(TEXT, "document"), "summary": Role(TARGET, "summary"), "references": Role(REFERENCES)},
    preprocess=_preprocess,
    collator=_collator,
    corpus=_corpus,
    metrics=_metrics,
    predict=_predict,
    trainer_defaults={"predict_with_generate": True, "train_sampling_strategy": "group_by_length"},
    seq2seq=True,
    tokens_per_sample=False,
)
