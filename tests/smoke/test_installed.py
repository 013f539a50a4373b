"""Installed as a package (the wheel, recipes inside it), the headline commands work from an empty folder."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """llmkit's wheel, built offline and installed (no dependencies: the test environment's) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", ROOT], check=True)
    (wheel,) = (tmp / "dist").glob("llmkit-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def _llmkit(site, cwd, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [site / "bin" / "llmkit", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_installed_package_is_the_one_that_runs(site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import llmkit; print(llmkit.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    assert (site / "llmkit" / "recipes" / "bert.yaml").is_file() and (site / "bin" / "llmkit").is_file()


def test_headline_commands_from_an_empty_folder(site, tmp_path):
    listed = _llmkit(site, tmp_path, "recipes")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert "recipes/bert.yaml" in names and "recipes/tiny/ner.yaml" in names

    shown = _llmkit(site, tmp_path, "recipe", "show", "bert")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"# {site / 'llmkit' / 'recipes' / 'bert.yaml'}"
    assert "task: mlm" in shown.stdout

    dry = _llmkit(site, tmp_path, "pretrain", "recipes/bert.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"Reading llmkit's shipped recipe {site / 'llmkit' / 'recipes' / 'bert.yaml'}" in dry.stderr
    assert "Estimate:" in dry.stdout and not (tmp_path / "runs").exists()

    run = _llmkit(site, tmp_path, "pretrain", "bert", "trainer.max_steps=2", "trainer.eval_strategy=no")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "runs" / "bert" / "summary.json").is_file()  # output_dir named after the recipe, here


def test_a_tiny_recipe_away_from_the_repository_says_where_its_fixtures_are(site, tmp_path):
    result = _llmkit(site, tmp_path, "finetune", "recipes/tiny/classification.yaml", "--dry-run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: data file not found: tests/fixtures/"), result.stderr
    assert lines[-1].endswith(
        "the tiny recipes read the fixtures in the llmkit repository's tests/ folder: run them from a clone's root"
    )
