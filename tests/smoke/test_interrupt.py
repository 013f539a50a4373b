"""Safe interruption: SIGINT saves a checkpoint, exits 130 with the resume command; the run then resumes."""

import signal
import subprocess
import sys

import pytest
from conftest import RECIPES, ROOT

from llmkit import checkpoints, engine
from llmkit.config import load_recipe, resolve

pytestmark = pytest.mark.smoke


def test_sigint_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"trainer.output_dir={out}",
        "trainer.max_steps=120",
        "trainer.save_steps=1000",
        "trainer.eval_steps=1000",
        "trainer.logging_steps=1",
        "trainer.disable_tqdm=true",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "pretrain", "recipes/tiny/gpt2.yaml", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # wait until training steps are being logged
        seen.append(line)
        if line.startswith("step ") and " loss " in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text[-2000:]
    assert "Resume with: llmkit pretrain recipes/tiny/gpt2.yaml" in text and "--resume" in text
    assert "Traceback" not in text
    ckpt = checkpoints.last_checkpoint(out)
    assert ckpt is not None and not (out / "summary.json").exists()
    stopped_at = int(ckpt.name.split("-")[1])
    assert 0 < stopped_at < 120
    summary = engine.train(resolve(load_recipe(RECIPES / "tiny/gpt2.yaml", overrides)), resume=True)
    assert summary["steps"] == 120


def test_a_second_signal_quits_at_once():
    import os

    from llmkit.interrupt import StopOnSignal

    previous = signal.getsignal(signal.SIGINT)
    stopper = StopOnSignal()
    with stopper:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: noted, training goes on to the end of the step
        assert stopper.requested
        with pytest.raises(KeyboardInterrupt):  # the second: out now (the CLI turns it into exit 130)
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
