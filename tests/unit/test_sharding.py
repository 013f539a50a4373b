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
