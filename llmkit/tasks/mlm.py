"""Masked language modeling (BERT-style pretraining) on packed text blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit.errors import RecipeError
from llmkit.tasks import Task
from llmkit.tasks._packing import pack, text_corpus


@dataclass
class Options:
    mlm_probability: float = 0.15  # share of tokens masked (BERT: 0.15; higher masks more, learns faster per step)


def _validate(recipe: Any) -> None:
    if not 0 < recipe.options.mlm_probability < 1:
        raise RecipeError(f"options.mlm_probability must be in (0, 1), got {recipe.options.mlm_probability}")


def _preprocess(recipe: Any, ds: Any, tokenizer: Any) -> Any:
    def encode(texts: list[str]) -> dict[str, list]:
        enc = tokenizer(texts, return_special_tokens_mask=True, return_attention_mask=False, verbose=False)
        return {"input_ids": enc["input_ids"], "special_tokens_mask": enc["special_tokens_mask"]}

    return pack(recipe, ds, TASK.column(recipe, "text"), encode)


def _collator(recipe: Any, tokenizer: Any, model: Any) -> Any:
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise RecipeError("the tokenizer has no mask token, which masked LM needs; use a BERT/RoBERTa tokenizer")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=recipe.options.mlm_probability)


TASK = Task(
    name="mlm",
    main_metric="eval_perplexity",
    pipeline_tag="fill-mask",
    stage="pretrain",
    description="masked language modeling (BERT-style) on packed text",
    auto_model="AutoModelForMaskedLM",
    peft_task_type="FEATURE_EXTRACTION",
    Options=Options,
    columns={"text": "text"},
    preprocess=_preprocess,
    collator=_collator,
    corpus=lambda recipe, train: text_corpus(TASK.column(recipe, "text"))(recipe, train),
    validate=_validate,
    perplexity=True,
)
