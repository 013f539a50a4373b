"""Two `llmkit tune` processes on one SQLite study: they run different trials, and the study ends with the
requested count, no trial twice."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.distributed


def test_two_tune_processes_share_one_study(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "llmkit", "tune", "recipes/tiny/classification-tune.yaml"]
    command += [f"trainer.output_dir={out}", "--trials", "4"]
    workers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    workers.append(
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
    results = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, results, strict=True):
        assert w.returncode == 0, err[-3000:]
    rows = json.loads((out / "trials.json").read_text())["trials"]
    done = [r for r in rows if r["state"] in ("complete", "pruned")]
    assert len(done) == 4 and len({r["number"] for r in rows}) == len(rows)
    assert all(r["state"] != "running" for r in rows)
    for r in done:  # every finished trial left a finished run
        assert json.loads((out / f"trial-{r['number']}" / "summary.json").read_text())["steps"] == r["steps"]
    started = [line for _, err in results for line in err.splitlines() if line.startswith("[llmkit] trial ")]
    assert len(started) == len(rows) == 4  # four trials started in all, split between the two processes
