"""Causal language modeling (GPT-style pretraining) on packed text blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit.rows import TEXT
from llmkit.tasks._packing import lm_metrics, pack, text_corpus
from llmkit.tasks.base import NEXT, Role, Task


@dataclass
class Options:
    pass


def _preprocess(recipe: Any, ds: Any, tokenizer: Any) -> Any:
    eos = tokenizer.eos_token_id

    def encode(texts: list[str]) -> dict[str, list]:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        # An end-of-text token between documents, so the model learns where one ends.
        return {"input_ids": [seq + [eos] for seq in ids] if eos is not None else ids}

    return pack(recipe, ds, TASK.column(recipe, "text"), encode)


def collate_blocks(features: list[dict]) -> dict:
    """Stack packed blocks; the labels are the inputs (the model shifts them). No padding exists to mask."""
    import torch

    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


TASK = Task(
    name="clm",
    recipe="gpt2.yaml",
    main_metric="eval_perplexity",
    pipeline_tag="text-generation",
    stage="pretrain",
    description="causal language modeling (GPT-style) on packed text",
    auto_model="AutoModelForCausalLM",
    peft_task_type="CAUSAL_LM",
    Options=Options,
    roles={"text": Role(TEXT, "text")},
    causal=True,
    soft_targets=NEXT,
    preprocess=_preprocess,
    collator=lambda recipe, tokenizer, model: collate_blocks,
    corpus=lambda recipe, train: text_corpus(TASK.column(recipe, "text"))(recipe, train),
    metrics=lm_metrics(shift=True),
    perplexity=True,
)
