"""`llmkit prepare` and data.prepared: tokenize and pack once, train from the folder as from the recipe itself."""

import json
import subprocess
import sys

import pytest
from conftest import RECIPES, ROOT
from safetensors.torch import load_file

from llmkit import engine
from llmkit.config import load_recipe, resolve
from llmkit.errors import DataError, LlmkitError
from llmkit.rundir import check_folder

pytestmark = pytest.mark.smoke

SHORT = ["trainer.max_steps=4", "trainer.save_strategy=no", "trainer.eval_steps=2", "trainer.logging_steps=1"]


def recipe(name, *overrides):
    return resolve(load_recipe(RECIPES / "tiny" / name, [*SHORT, *overrides]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "gpt2"
    manifest = engine.prepare(recipe("gpt2.yaml"), out)
    assert manifest["task"] == "clm" and manifest["block_size"] == 32
    assert manifest["splits"]["train"]["blocks"] > 100 and manifest["tokenizer"]["trained"]["vocab_size"] == 400
    return out


def test_a_prepared_folder_trains_as_the_recipe_tokenizing_itself(folder, tmp_path):
    engine.train(recipe("gpt2.yaml", f"trainer.output_dir={tmp_path}/itself"))
    engine.train(recipe("gpt2.yaml", f"trainer.output_dir={tmp_path}/prepared", f"data.prepared={folder}"))
    logs = [
        json.loads((tmp_path / r / "trainer_state.json").read_text())["log_history"] for r in ("itself", "prepared")
    ]
    losses = [[(h["step"], h.get("loss"), h.get("eval_loss")) for h in log] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) >= 4
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("itself", "prepared"))
    assert all((a[k] == b[k]).all() for k in a)
    assert json.loads((tmp_path / "prepared" / "preflight.json").read_text())["prepared"] == str(folder)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.max_length=64", "holds blocks of 32 tokens, this recipe has data.max_length=64"),
        ("tokenizer.train.vocab_size=500", "this recipe trains its tokenizer with"),
        ("tokenizer.name_or_path=RUN", "was tokenized by another tokenizer"),
    ],
)
def test_a_run_that_would_make_other_blocks_is_refused(folder, tmp_path, override, says):
    if "RUN" in override:  # a tokenizer of another corpus: the tiny BERT's WordPiece
        engine.prepare(recipe("bert.yaml"), tmp_path / "bert")
        override = override.replace("RUN", str(tmp_path / "bert" / "tokenizer"))
    with pytest.raises(DataError, match=says):
        engine.train(recipe("gpt2.yaml", f"trainer.output_dir={tmp_path}/run", f"data.prepared={folder}", override))
    assert not (tmp_path / "run").exists()


def test_a_folder_of_another_task_or_none_is_refused(folder, tmp_path):
    with pytest.raises(DataError, match="was prepared for task 'clm', this recipe is 'mlm'"):
        engine.train(recipe("bert.yaml", f"trainer.output_dir={tmp_path}/run", f"data.prepared={folder}"))
    with pytest.raises(DataError, match="is not a prepared folder"):
        engine.train(recipe("gpt2.yaml", f"trainer.output_dir={tmp_path}/run", f"data.prepared={tmp_path}"))


def test_prepare_never_replaces_a_folder_silently(folder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(LlmkitError, match="is not a prepared folder"):
        engine.prepare(recipe("gpt2.yaml"), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep"
    with pytest.raises(LlmkitError, match="pass --overwrite"):
        engine.prepare(recipe("gpt2.yaml"), folder)
    with pytest.raises(Exception, match="packs pretraining corpora"):
        engine.prepare(recipe("classification.yaml"), tmp_path / "cls")


def test_check_reads_a_prepared_folder_and_finds_damage(folder, tmp_path):
    lines, problem = check_folder(folder)
    assert problem is None and any("train" in line and "intact" in line for line in lines)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["blocks"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lines, problem = check_folder(copy)
    assert "split train has" in problem and any("DIFFERS" in line for line in lines)
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "check", str(copy)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_check_of_a_recipe_reading_a_prepared_folder(folder):
    lines, problem = engine.check_packed(recipe("gpt2.yaml", f"data.prepared={folder}"), engine.get_task("clm"))
    assert problem is None and any("validation" in line and "intact" in line for line in lines)
    with pytest.raises(DataError, match="data.max_length=16"):
        engine.check_packed(
            recipe("gpt2.yaml", f"data.prepared={folder}", "data.max_length=16"), engine.get_task("clm")
        )
