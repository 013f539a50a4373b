"""Shared by the pretraining tasks: drop empty texts, tokenize and pack into fixed-length blocks; extra metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from llmkit.data import columns_of, is_stream, require_columns, split_origin
from llmkit.errors import DataError


def text_corpus(column: str) -> Callable[..., Iterator[str]]:
    """Texts to train a tokenizer on: the non-empty values of one column."""

    def corpus(recipe: Any, train: Any) -> Iterator[str]:
        for batch in train.iter(batch_size=1000):
            yield from (t for t in batch[column] if isinstance(t, str) and t.strip())

    return corpus


def pack(recipe: Any, ds: Any, column: str, encode: Callable[[list[str]], dict[str, list]]) -> Any:
    """Tokenize `column` with `encode` and pack the token stream into blocks of data.max_length.

    Empty or whitespace-only rows are dropped first; the tail of each 1,000-row batch that
    does not fill a block is dropped (as in transformers' run_mlm / run_clm), so no padding is
    ever trained on. Cached by datasets' fingerprint: a second run reuses the blocks.
    """
    block = recipe.data.max_length
    for split in ds:
        require_columns(ds[split], {"text": column}, split_origin(recipe, split))

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[column] if isinstance(t, str) and t.strip()]
        enc = encode(texts)
        out = {}
        for key, seqs in enc.items():
            flat = [x for seq in seqs for x in seq]
            usable = len(flat) // block * block
            out[key] = [flat[i : i + block] for i in range(0, usable, block)]
        return out

    packed = {}
    for split, data in ds.items():
        if is_stream(data):  # a stream (data.streaming): packed as it is read, its emptiness seen then
            packed[split] = data.map(tokenize_and_pack, batched=True, batch_size=1000, remove_columns=columns_of(data))
            continue
        packed[split] = data.map(
            tokenize_and_pack,
            batched=True,
            batch_size=1000,
            remove_columns=data.column_names,
            num_proc=recipe.data.num_proc,
            desc=f"Tokenizing and packing {split} into blocks of {block}",
        )
        if len(packed[split]) == 0:
            raise DataError(
                f"the {split} split gives no block of data.max_length={block} tokens "
                f"({len(data)} rows, all empty or too short); add text or lower data.max_length"
            )
    from datasets import DatasetDict

    return packed if any(is_stream(d) for d in packed.values()) else DatasetDict(packed)


def lm_metrics(shift: bool) -> Callable[..., tuple[Any, Any]]:
    """The recipe's extra `metrics:` on a language model's token predictions, at the positions its loss uses
    (the masked ones for MLM; every next token for CLM, `shift`). No extra metrics: nothing is computed."""

    def metrics(recipe: Any, tokenizer: Any, eval_ds: Any) -> tuple[Any, Any]:
        if not recipe.metrics:
            return None, None
        from llmkit.metrics import compute_extra, extra_metrics

        extra = extra_metrics(recipe.metrics)

        def reduce(logits: Any, labels: Any) -> Any:
            predicted = (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)
            if predicted.shape == labels.shape:
                return predicted
            # The MLM head ran on the masked positions only (tasks/mlm.py): put them back in place.
            full = labels.new_full(labels.shape, -100)
            full[labels != -100] = predicted
            return full

        def compute(p: Any) -> dict:
            preds, refs = p.predictions, p.label_ids
            if shift:
                preds, refs = preds[:, :-1], refs[:, 1:]
            keep = refs != -100
            return compute_extra(extra, preds[keep].tolist(), refs[keep].tolist())

        return compute, reduce

    return metrics
