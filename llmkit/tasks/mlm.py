"""Masked language modeling (BERT-style pretraining) on packed text blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit import unpad
from llmkit.errors import RecipeError
from llmkit.rows import TEXT
from llmkit.tasks._packing import lm_metrics, pack, text_corpus
from llmkit.tasks.base import Role, Task


@dataclass
class Options:
    mlm_probability: float = 0.15  # share of tokens masked (BERT: 0.15; higher masks more, learns faster per step)
    top_k: int = 5  # predict: the candidates listed for each [MASK]


def _validate(recipe: Any) -> None:
    if not 0 < recipe.options.mlm_probability < 1:
        raise RecipeError(f"options.mlm_probability must be in (0, 1), got {recipe.options.mlm_probability}")
    if recipe.options.top_k < 1:
        raise RecipeError(f"options.top_k must be at least 1, got {recipe.options.top_k}")


def _need_mask_token(tokenizer: Any) -> None:
    if tokenizer.mask_token is None:
        raise RecipeError("the tokenizer has no mask token, which masked LM needs; use a BERT/RoBERTa tokenizer")


def _seed_masks(collator: Any, value: int) -> None:
    """Make `collator` mask with a generator seeded by `value` instead of the global RNG.

    DataCollatorForLanguageModeling draws its masks from `collator.generator` (None: the global RNG).
    """
    import torch

    collator.generator = torch.Generator().manual_seed(value)


def _collator(recipe: Any, tokenizer: Any, model: Any) -> Any:
    """A DataCollatorForLanguageModeling whose masks depend on the batch, not on a random stream.

    Each training batch is masked with a generator seeded by the seed and the batch's tokens, so
    masks never depend on how many batches were collated before: a resumed run (which collates
    from the resume step on, while the dataloader prefetches ahead) masks exactly as an
    uninterrupted one, with any number of processes or dataloader workers. Shuffling gives a
    block new neighbours, so new masks, every epoch. Rows that already carry labels (the
    evaluation splits, masked once at preprocessing) are only stacked: every evaluation sees
    the same masks, so perplexities compare across steps and runs.
    """
    import hashlib

    import numpy as np
    import torch
    from transformers import DataCollatorForLanguageModeling

    _need_mask_token(tokenizer)
    seed = recipe.args.seed

    class MaskingCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples: list[dict]) -> dict:
            if "labels" in examples[0]:
                return {k: torch.tensor([e[k] for e in examples]) for k in ("input_ids", "labels")}
            digest = hashlib.blake2b(digest_size=8)
            for e in examples:
                digest.update(np.asarray(e["input_ids"], dtype=np.int64).tobytes())
            _seed_masks(self, (int.from_bytes(digest.digest(), "little") >> 1) ^ seed)
            return super().torch_call(examples)

    return MaskingCollator(tokenizer, mlm=True, mlm_probability=recipe.options.mlm_probability)


def _preprocess(recipe: Any, ds: Any, tokenizer: Any) -> Any:
    def encode(texts: list[str]) -> dict[str, list]:
        enc = tokenizer(texts, return_special_tokens_mask=True, return_attention_mask=False, verbose=False)
        return {"input_ids": enc["input_ids"], "special_tokens_mask": enc["special_tokens_mask"]}

    packed = pack(recipe, ds, TASK.column(recipe, "text"), encode)

    from transformers import DataCollatorForLanguageModeling

    _need_mask_token(tokenizer)
    seed = recipe.args.seed if recipe.args is not None else 42
    masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=recipe.options.mlm_probability)

    def mask_once(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        import torch

        # Seeded by position, not by call order: the same masks with any num_proc and on every run.
        _seed_masks(masker, seed * 1_000_003 + indices[0])
        ids, labels = masker.torch_mask_tokens(
            torch.tensor(batch["input_ids"]), special_tokens_mask=torch.tensor(batch["special_tokens_mask"])
        )
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    for split in packed:
        if split != "train":
            packed[split] = packed[split].map(
                mask_once,
                batched=True,
                with_indices=True,
                remove_columns=["special_tokens_mask"],
                desc=f"Masking {split} once (the same masks at every evaluation)",
            )
    return packed


def predict_masked_positions_only(model: Any) -> Any:
    """Compute the vocabulary head and the loss only where labels are set (the ~15% masked positions).

    The head over the full vocabulary at every position is a quarter of a BERT training step, and
    85% of it feeds positions the loss ignores. Two forward pre-hooks (no change to the model's
    code or weights) pass the masked rows only: the model's labels become the masked labels, and
    the head's input becomes the hidden states at those positions, so `logits` is
    [masked positions, vocab] and the loss is the same mean cross-entropy. Without labels (inference)
    nothing changes. Returns the model.
    """
    import torch

    # BERT's and RoBERTa's heads (transform + decoder) take the hidden states; else the decoder alone.
    heads = [getattr(model, n, None) for n in ("cls", "lm_head")] + [model.get_output_embeddings()]
    head = next((h for h in heads if isinstance(h, torch.nn.Module)), None)
    if head is None:
        return model
    kept: dict[str, Any] = {}

    def take_masked_labels(module: Any, args: tuple, kwargs: dict) -> Any:
        labels = kwargs.get("labels")
        kept.pop("where", None)
        if labels is None or args:  # positional inputs: not the Trainer's call, leave it alone
            return None
        where = labels != -100
        kept["where"] = where
        return args, {**kwargs, "labels": labels[where]}

    def take_masked_rows(module: Any, args: tuple) -> Any:
        where = kept.get("where")
        if where is None or args[0].shape[:-1] != where.shape:
            return None
        return (args[0][where], *args[1:])

    model.register_forward_pre_hook(take_masked_labels, with_kwargs=True)
    head.register_forward_pre_hook(take_masked_rows)
    return model


def _speed_up(recipe: Any, model: Any) -> None:
    # Not under nn.DataParallel (several GPUs, one process): its replicas share the hooks' state across
    # threads. Not for models that already predict only at masked positions (ModernBERT's sparse_prediction).
    if (recipe.args is not None and recipe.args.n_gpu > 1) or getattr(model.config, "sparse_prediction", False):
        return
    if not unpad.positions_skipped(recipe):  # model.skip_positions: false
        return
    predict_masked_positions_only(model)


def _predict(recipe: Any, model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 32) -> list[dict]:
    """Fill each [MASK] (or the tokenizer's own mask token) with its top-k tokens and their probabilities;
    `filled` is the text with every mask replaced by its best token."""
    import torch

    _need_mask_token(tokenizer)
    mask = tokenizer.mask_token
    texts = [str(r[TASK.column(recipe, "text")]).replace("[MASK]", mask) for r in rows]
    for i, text in enumerate(texts, 1):
        if mask not in text:
            raise RecipeError(f"row {i} has no {mask} to fill; mark each word to predict with [MASK]")
    out = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tokenizer(batch, truncation=True, max_length=recipe.data.max_length, padding=True, return_tensors="pt")
        at = enc["input_ids"] == tokenizer.mask_token_id
        for row, text in enumerate(batch):
            if int(at[row].sum()) < text.count(mask):
                raise RecipeError(
                    f"row {start + row + 1}: a {mask} lies beyond data.max_length={recipe.data.max_length} tokens; "
                    "shorten the text or raise data.max_length"
                )
        with torch.no_grad():  # the vocabulary distribution at the masks only (B x L x V would not fit long inputs)
            top = model(**enc).logits[at].float().softmax(-1).topk(recipe.options.top_k)
        fills = [
            [
                {"token": tokenizer.decode([int(i)]).strip(), "score": round(float(p), 4)}
                for p, i in zip(*t, strict=True)
            ]
            for t in zip(top.values, top.indices, strict=True)
        ]
        for text in batch:
            mine, fills = fills[: text.count(mask)], fills[text.count(mask) :]
            pieces = text.split(mask)
            filled = pieces[0] + "".join(f[0]["token"] + piece for f, piece in zip(mine, pieces[1:], strict=True))
            out.append({"fills": mine, "filled": filled})
    return out


TASK = Task(
    name="mlm",
    recipe="bert.yaml",
    main_metric="eval_perplexity",
    pipeline_tag="fill-mask",
    stage="pretrain",
    description="masked language modeling (BERT-style) on packed text",
    auto_model="AutoModelForMaskedLM",
    peft_task_type="FEATURE_EXTRACTION",
    Options=Options,
    roles={"text": Role(TEXT, "text")},
    preprocess=_preprocess,
    collator=_collator,
    corpus=lambda recipe, train: text_corpus(TASK.column(recipe, "text"))(recipe, train),
    metrics=lm_metrics(shift=False),
    predict=_predict,
    validate=_validate,
    prepare_model=lambda recipe, model: _speed_up(recipe, model),
    perplexity=True,
    random_inputs=True,  # masks drawn by the collator each time
)
