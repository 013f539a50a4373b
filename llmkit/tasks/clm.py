"""Causal language modeling (GPT-style pretraining) on packed text blocks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmkit import fused
from llmkit.errors import RecipeError
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


def _speed_up(recipe: Any, model: Any) -> None:
    if fused.wanted(recipe, model):  # metrics on the predictions (recipe `metrics:`) need evaluation's logits
        fused.fuse_head_and_loss(model, logits_in_eval=bool(recipe.metrics))


def _budget(recipe: Any, model: Any) -> tuple[dict, int]:
    """generate() settings (greedy and 50 new tokens unless `generation:` says otherwise; its max_length is the
    prompt and completion together) and the prompt's token limit: both fit in the model's positions."""
    settings = {"do_sample": False, **(recipe.generation or {})}
    total = settings.pop("max_length", None)
    room = getattr(model.config, "max_position_embeddings", None) or recipe.data.max_length
    new = settings.get("max_new_tokens") or (max(1, total // 2) if total else 50)
    if new > room // 2:  # prompt and completion share the model's positions: keep room for both
        logging.getLogger("llmkit").warning(
            "max_new_tokens %d capped at %d: the model has %d positions", new, room // 2, room
        )
        new = room // 2
    settings["max_new_tokens"] = new
    return settings, max(1, min(recipe.data.max_length, (total or room) - new, room - new))


def _predict(recipe: Any, model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 16) -> list[dict]:
    """Continue each prompt: batched left-padded generation with the KV cache (see _budget). A prompt too long
    keeps its end. The tokenizer's padding and truncation sides are restored afterwards."""
    import torch

    prompts = [str(r[TASK.column(recipe, "text")]) for r in rows]
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise RecipeError(f"row {i} has an empty prompt; give each row some text to continue")
    settings, limit = _budget(recipe, model)
    sides, pad = (tokenizer.padding_side, tokenizer.truncation_side), tokenizer.pad_token
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size],
                truncation=True,
                max_length=limit,
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            enc.pop("token_type_ids", None)
            with torch.no_grad():
                ids = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, use_cache=True, **settings)
            completions = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [{"completion": c} for c in completions]
    finally:
        (tokenizer.padding_side, tokenizer.truncation_side), tokenizer.pad_token = sides, pad
    return out


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
    prepare_model=_speed_up,
    predict=_predict,
    perplexity=True,
)
