"""Two nodes on one machine: two torchrun launchers (`--nnodes 2`, one process each) on the loopback address,
as a user starts one per machine. One run: world size 2, one output folder, one report, metrics of both."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, agree_but_for_near_ties
from test_two_processes import KILL

from llmkit import engine, rundir

pytestmark = pytest.mark.distributed


TORCHRUN = ["torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
ACCELERATE = ["accelerate.commands.launch", "--config_file", "recipes/accelerate/multi-node.yaml"]
ACCELERATE += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1"]


@pytest.mark.parametrize(
    "launcher, rank_flag, port_flag",
    [(TORCHRUN, "--node_rank", "--master_port"), (ACCELERATE, "--machine_rank", "--main_process_port")],
    ids=["torchrun", "accelerate-multi-node-config"],
)
def test_two_launchers_on_the_loopback_address_train_one_run(tmp_path, monkeypatch, launcher, rank_flag, port_flag):
    out = tmp_path / "multinode"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    program = ["-m", "llmkit", "finetune", "recipes/tiny/classification.yaml", f"trainer.output_dir={out}"]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", *launcher, port_flag, port, rank_flag, str(rank), *program],
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
    agree_but_for_near_ties(summary["final_metrics"]["eval_accuracy"], single["eval_accuracy"], 24)


def _two_nodes(outs, *extra, kill=None):
    """Two launchers (node ranks 0, 1), one process each, node r writing to outs[r]: machines without a
    shared filesystem. With kill='all', each worker SIGKILLs its launcher and itself at step 5."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill:
        env |= {"LLMKIT_TEST_KILL_AT": "5", "LLMKIT_TEST_KILL": kill}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    nodes = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    program = ["--no-python", sys.executable, "-c", KILL] if kill else ["-m", "llmkit"]
    settings = ["pretrain", "recipes/tiny/gpt2.yaml", "trainer.save_on_each_node=true", "trainer.max_steps=6"]
    settings += ["trainer.save_steps=2", "trainer.save_total_limit=5", "trainer.logging_steps=1", *extra]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *nodes, "--node_rank", str(rank), *program, *settings]
            + [f"trainer.output_dir={outs[rank]}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    return [(p.wait(timeout=300), *p.communicate()) for p in launchers]


def test_save_on_each_node_keeps_a_whole_run_on_each_node_and_resumes_from_the_local_copy(tmp_path):
    from safetensors.torch import load_file

    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    killed = _two_nodes(outs, kill="all")
    assert all(rc != 0 for rc, _, _ in killed)
    for rank, out in enumerate(outs):  # each node: its own complete checkpoints, with its own RNG state
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"], rank
        assert sorted(p.name for p in (out / "checkpoint-4").glob("rng_state_*")) == [f"rng_state_{rank}.pth"]
        assert (out / "checkpoint-4" / "manifest.json").exists() and (out / "recipe.yaml").exists()
    # A damaged checkpoint-4 on node 1 only: the nodes would resume from different steps; both refuse, saying so.
    damaged = outs[1] / "checkpoint-4" / "scheduler.pt"
    good = damaged.read_bytes()
    damaged.write_bytes(b"x")
    split = _two_nodes(outs, "--resume")
    assert all(rc != 0 and "exitcode  : 2" in err for rc, _, err in split)  # torchrun: 1; the workers: 2
    assert all("resume from different checkpoints (checkpoint-2, checkpoint-4)" in err for _, _, err in split)
    damaged.write_bytes(good)
    resumed = _two_nodes(outs, "--resume")
    for rc, _, err in resumed:
        assert rc == 0, "\n".join(e[-3000:] for _, _, e in resumed)
        assert "from checkpoint-4" in err  # each node read its local copy
    a, b = (load_file(out / "model.safetensors") for out in outs)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    summaries = [json.loads((out / "summary.json").read_text()) for out in outs]
    assert summaries[0]["world_size"] == summaries[1]["world_size"] == 2
    assert summaries[0]["final_metrics"]["eval_loss"] == summaries[1]["final_metrics"]["eval_loss"]
    assert [stdout.count("Done in") for _, stdout, _ in resumed] == [1, 0]  # one report, from node 0
