"""The peft section: validated as LoraConfig, task_type from the task, the NER LoRA budget."""

import pytest
from conftest import RECIPES

from llmkit.config import load_recipe, resolve
from llmkit.errors import RecipeError


def test_task_type_is_filled_from_the_task():
    recipe = resolve(load_recipe(RECIPES / "ner-lora.yaml"))
    assert recipe.lora.task_type == "TOKEN_CLS" and recipe.lora.r == 8
    gpt = resolve(load_recipe(RECIPES / "tiny/gpt2-lora.yaml"))
    assert gpt.lora.task_type == "CAUSAL_LM"


def test_bad_lora_key_fails_at_validation():
    with pytest.raises(RecipeError, match=r"unknown key 'peft.lora_alhpa' \(did you mean 'lora_alpha'\?\)"):
        resolve(load_recipe(RECIPES / "ner-lora.yaml", ["peft.lora_alhpa=3"]))


def test_shipped_ner_lora_trains_under_5_percent():
    """bert-base-cased's architecture (on the meta device: no download, no memory) with the recipe's LoRA."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForTokenClassification, BertConfig

    from llmkit.modeling import count_parameters

    recipe = resolve(load_recipe(RECIPES / "ner-lora.yaml"))
    with torch.device("meta"):
        model = AutoModelForTokenClassification.from_config(BertConfig(vocab_size=28996, num_labels=9))
    trainable, total = count_parameters(get_peft_model(model, recipe.lora))
    assert trainable / total < 0.05
    assert trainable > 9 * 768  # the new tagging head is trained too
