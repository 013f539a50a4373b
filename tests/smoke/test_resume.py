"""Exact resume and atomic checkpoints, with real faults: SIGKILL mid-epoch, SIGKILL during a save, a full disk.

Each killed run is resumed and must end with the same weights and the same logged losses (from the
resume step on) as an uninterrupted run of the same recipe and seed.
"""

import errno
import json
import os
import subprocess
import sys

import pytest
from conftest import RECIPES, ROOT

from llmkit import checkpoints, engine
from llmkit.config import load_recipe, resolve
from llmkit.errors import LlmkitError

pytestmark = pytest.mark.smoke

# Runs the CLI in a child process that SIGKILLs itself at step LLMKIT_TEST_KILL_AT: after that
# optimizer step ("step"), or in the middle of saving that step's checkpoint ("save": the weights
# and optimizer are written, the RNG states and trainer state are not).
KILLER = """
import os, signal, sys
import transformers
import llmkit.interrupt as it
at, where = int(os.environ["LLMKIT_TEST_KILL_AT"]), os.environ["LLMKIT_TEST_KILL_IN"]
if where == "step":
    step_end = it.StopOnSignal.on_step_end
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_end(self, args, state, control, **kw)
    it.StopOnSignal.on_step_end = on_step_end
else:
    save_rng = transformers.Trainer._save_rng_state
    def _save_rng_state(self, output_dir):
        if self.state.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng(self, output_dir)
    transformers.Trainer._save_rng_state = _save_rng_state
from llmkit.cli import main
sys.argv = ["llmkit", *sys.argv[1:]]
main()
"""

# 6 steps, a checkpoint every 3, a loss logged at every step; batches of 8 so that step 5 is mid-epoch.
STEPS = [
    "trainer.max_steps=6",
    "trainer.save_strategy=steps",
    "trainer.save_steps=3",
    "trainer.eval_strategy=steps",
    "trainer.eval_steps=3",
    "trainer.logging_steps=1",
    "trainer.per_device_train_batch_size=8",
    "trainer.report_to=none",
]


def _overrides(out, extra=()):
    return [f"trainer.output_dir={out}", *STEPS, *extra]


def _killed(command, name, out, at, where, extra=()):
    env = dict(os.environ, LLMKIT_TEST_KILL_AT=str(at), LLMKIT_TEST_KILL_IN=where)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, command, f"recipes/{name}", *_overrides(out, extra)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, not a clean exit


def _weights(out):
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {out}"
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _losses(out, after):
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > after}


def _assert_same_run(a, b, resumed_from):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff < 1e-6, f"weights differ by {diff}"
    la, lb = _losses(a, resumed_from), _losses(b, resumed_from)
    assert sorted(la) == list(range(resumed_from + 1, 7))
    assert la == lb


@pytest.mark.parametrize(
    "command, name, extra",
    [
        ("pretrain", "tiny/gpt2.yaml", ()),
        ("pretrain", "tiny/bert.yaml", ()),
        ("finetune", "tiny/classification.yaml", ()),
        ("finetune", "tiny/ner-lora.yaml", ()),
    ],
)
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, command, name, extra):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    engine.train(resolve(load_recipe(RECIPES / name, _overrides(reference, extra))))
    _killed(command, name, killed, at=5, where="step", extra=extra)
    assert checkpoints.last_checkpoint(killed).name == "checkpoint-3" and not (killed / "summary.json").exists()
    summary = engine.train(resolve(load_recipe(RECIPES / name, _overrides(killed, extra))), resume=True)
    assert summary["steps"] == 6
    _assert_same_run(reference, killed, resumed_from=3)


def test_sigkill_during_a_save_keeps_the_last_good_checkpoint(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    extra = ("trainer.save_total_limit=1",)
    engine.train(resolve(load_recipe(RECIPES / "tiny/bert.yaml", _overrides(reference, extra))))
    _killed("pretrain", "tiny/bert.yaml", killed, at=6, where="save", extra=extra)
    # The half-written checkpoint-6 is not a checkpoint; save_total_limit=1 did not delete checkpoint-3.
    assert not (killed / "checkpoint-6").exists()
    assert (killed / ".partial" / "checkpoint-6" / "model.safetensors").exists()
    assert checkpoints.last_checkpoint(killed).name == "checkpoint-3"
    engine.train(resolve(load_recipe(RECIPES / "tiny/bert.yaml", _overrides(killed, extra))), resume=True)
    assert not (killed / ".partial").exists()
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-6"]  # rotation after the new one
    _assert_same_run(reference, killed, resumed_from=3)


def test_disk_full_during_a_save_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    import transformers

    out = tmp_path / "run"
    recipe = lambda: resolve(load_recipe(RECIPES / "tiny/gpt2.yaml", _overrides(out)))  # noqa: E731
    save_rng = transformers.Trainer._save_rng_state

    def full_disk(self, output_dir):
        if self.state.global_step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_rng(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", full_disk)
    with pytest.raises(LlmkitError) as info:
        engine.train(recipe())
    message = str(info.value)
    assert "\n" not in message
    assert "could not save checkpoint checkpoint-6" in message and "No space left on device" in message
    assert "--resume" in message
    assert checkpoints.last_checkpoint(out).name == "checkpoint-3" and not (out / ".partial").exists()
    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", save_rng)  # space freed: resume
    assert engine.train(recipe(), resume=True)["steps"] == 6


def test_resume_from_a_named_checkpoint_into_a_new_folder(tmp_path):
    """trainer.resume_from_checkpoint=PATH continues another run's checkpoint, exactly; checkpoints hold no pickle."""
    reference, other = tmp_path / "reference", tmp_path / "other"
    engine.train(resolve(load_recipe(RECIPES / "tiny/gpt2.yaml", _overrides(reference))))
    ckpt = reference / "checkpoint-3"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pkl")) == []
    summary = engine.train(
        resolve(load_recipe(RECIPES / "tiny/gpt2.yaml", _overrides(other, [f"trainer.resume_from_checkpoint={ckpt}"])))
    )
    assert summary["steps"] == 6
    _assert_same_run(reference, other, resumed_from=3)
    # --overwrite on the run that holds the named checkpoint would delete it: refused, nothing deleted.
    named = [f"trainer.resume_from_checkpoint={ckpt}"]
    with pytest.raises(LlmkitError, match="--overwrite would delete"):
        engine.train(resolve(load_recipe(RECIPES / "tiny/gpt2.yaml", _overrides(reference, named))), overwrite=True)
    assert (ckpt / "trainer_state.json").exists() and (reference / "summary.json").exists()
    with pytest.raises(LlmkitError, match="is not a complete checkpoint"):
        engine.train(
            resolve(
                load_recipe(
                    RECIPES / "tiny/gpt2.yaml",
                    _overrides(tmp_path / "third", [f"trainer.resume_from_checkpoint={tmp_path / 'nothing'}"]),
                )
            )
        )


def test_a_damaged_checkpoint_is_skipped_at_resume_and_named_by_check(tmp_path, caplog):
    """Each checkpoint holds a manifest (sizes, sha256) and its recipe; resume verifies the newest and falls
    back to an intact one; `llmkit check RUN_DIR` names the damaged one; a checkpoint can be evaluated."""
    from typer.testing import CliRunner

    from llmkit import rundir
    from llmkit.checkpoints import MANIFEST, damage
    from llmkit.cli import app

    out = tmp_path / "run"

    def recipe():
        overrides = [
            f"trainer.output_dir={out}",
            "trainer.max_steps=6",
            "trainer.save_steps=2",
            "trainer.save_total_limit=5",
        ]
        return resolve(load_recipe(RECIPES / "tiny/gpt2.yaml", overrides))

    engine.train(recipe())
    ckpts = checkpoints.checkpoints(out)
    assert [c.name for c in ckpts] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]
    manifest = json.loads((ckpts[0] / MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "recipe.yaml"} <= set(manifest)
    assert all(damage(c) is None for c in ckpts)
    # A killed run whose newest checkpoint was damaged afterwards (a disk, a copy cut short).
    (out / "summary.json").unlink()
    weights = ckpts[0] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = CliRunner().invoke(app, ["check", str(out)])
    assert result.exit_code == 2 and "checkpoint-6             damaged: model.safetensors has " in result.output
    assert "checkpoint-4             intact" in result.output
    assert f"error: {out}: damaged checkpoints: checkpoint-6; --resume skips them" in result.output
    with caplog.at_level("WARNING", logger="llmkit"):
        summary = engine.train(recipe(), resume=True)
    assert summary["steps"] == 6
    assert any(f"{ckpts[0]} is damaged (model.safetensors has" in m for m in caplog.messages)
    # A checkpoint is self-describing: evaluated on its own.
    metrics = engine.evaluate(rundir.recipe_for_evaluation(out / "checkpoint-4", []), "validation")
    assert metrics["samples"] > 0
