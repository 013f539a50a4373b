"""Every shipped recipe validates through the real loader, so none can rot."""

import pytest
from conftest import RECIPES

from llmkit.config import load_recipe, resolve

ALL = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts)


def test_recipes_exist():
    names = {p.relative_to(RECIPES).as_posix() for p in ALL}
    assert {"bert.yaml", "gpt2.yaml", "tiny/bert.yaml", "tiny/gpt2.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe_validates(path):
    recipe = resolve(load_recipe(path))
    assert recipe.args.output_dir.startswith("runs/")
    text = path.read_text()
    assert text.startswith("# recipes/"), "a shipped recipe opens with a comment naming itself"
    assert "llmkit " in text.split("\n\n")[0], "its opening comment shows the command that runs it"
