"""FSDP settings in a recipe: the non-deprecated form validates, and what a sharded checkpoint is, is said plainly."""

import pytest
from conftest import RECIPES

from llmkit import rundir
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError, RecipeError


def test_fsdp_true_with_an_fsdp_config_is_a_valid_recipe():
    overrides = ["trainer.fsdp=true", "trainer.fsdp_config={version: 2, state_dict_type: SHARDED_STATE_DICT}"]
    args = resolve(load_recipe(RECIPES / "tiny" / "gpt2.yaml", overrides)).args
    assert args.fsdp is True and args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"


def test_fsdp_of_the_wrong_type_is_still_one_line():
    with pytest.raises(RecipeError, match="trainer.fsdp must be a string"):
        resolve(load_recipe(RECIPES / "tiny" / "gpt2.yaml", ["trainer.fsdp=3"]))


def test_a_sharded_checkpoint_is_named_with_the_fix(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ckpt / "recipe.yaml").write_text((RECIPES / "tiny" / "gpt2.yaml").read_text())
    with pytest.raises(LlmkitError, match="is a sharded FSDP checkpoint .*--resume.*FULL_STATE_DICT"):
        rundir.recipe_for_evaluation(ckpt, [])


def test_the_launchers_mixed_precision_is_said_and_reported(monkeypatch, caplog):
    """accelerate launch --mixed_precision bf16 wins over trainer.bf16=false in transformers: say so, report it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="llmkit"):
        args = resolve(load_recipe(RECIPES / "tiny" / "gpt2.yaml", ["trainer.bf16=false"])).args
    assert args.mixed_precision == "bf16" and not args.bf16
    assert "accelerate launch's mixed_precision bf16 applies" in caplog.text
