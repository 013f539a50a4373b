"""Two nodes on one machine: two torchrun launchers (`--nnodes 2`, one process each) on the loopback address,
as a user starts one per machine. One run: world size 2, one output folder, one report, metrics of both."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

from llmkit import engine, rundir

pytestmark = pytest.mark.distributed


def test_two_launchers_on_the_loopback_address_train_one_run(tmp_path, monkeypatch):
    out = tmp_path / "multinode"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    nodes = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    program = ["-m", "llmkit", "finetune", "recipes/tiny/classification.yaml", f"trainer.output_dir={out}"]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *nodes, "--node_rank", str(rank), *program],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [p.communicate(timeout=300) for p in launchers]
    for p, (_, err) in zip(launchers, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multinode"]
    assert [stdout.count("Done in") for stdout, _ in results] == [1, 0]  # node 0's rank 0 reports
    monkeypatch.chdir(ROOT)  # the evaluation gathered both processes' predictions: one process agrees
    single = engine.evaluate(rundir.recipe_for_evaluation(out, []), "validation")
    assert single["samples"] == 24
    assert single["eval_accuracy"] == pytest.approx(summary["final_metrics"]["eval_accuracy"], abs=1e-9)
