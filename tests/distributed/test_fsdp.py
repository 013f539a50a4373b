"""FSDP2 on two CPU processes (gloo): the shipped accelerate config and a recipe's trainer.fsdp shard for real,
checkpoints are sharded, a killed run resumes to the same weights, and the run folder holds one full model
that evaluate, predict and export use in one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT
from test_two_processes import KILL
from typer.testing import CliRunner

from llmkit.cli import app

pytestmark = pytest.mark.distributed

STEPS = ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=5", "trainer.bf16=false"]
FSDP = ["trainer.fsdp=true", "trainer.fsdp_config={version: 2, state_dict_type: SHARDED_STATE_DICT}"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(launcher: list, program: list, out, *extra, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    recipe = ["pretrain", "recipes/tiny/gpt2.yaml", f"trainer.output_dir={out}", *STEPS, *extra]
    return subprocess.run(
        [sys.executable, "-m", *launcher, *program, *recipe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


def _torchrun(out, *extra, kill_at=None) -> subprocess.CompletedProcess:
    """torchrun, 2 processes, FSDP from the recipe; with kill_at, the launcher and both workers are SIGKILLed there."""
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port()]
    if kill_at is None:
        return _launch(launcher, ["-m", "llmkit"], out, *FSDP, *extra)
    program = ["--no-python", sys.executable, "-c", KILL]
    env = {"LLMKIT_TEST_KILL_AT": str(kill_at), "LLMKIT_TEST_KILL": "all"}
    return _launch(launcher, program, out, *FSDP, *extra, env_extra=env)


def test_fsdp_on_two_cpu_processes_shards_resumes_exactly_and_serves(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # The shipped config, as its header says to run it on CPU: FSDP2, sharded checkpoints, 2 processes.
    accelerate = ["accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml"]
    accelerate += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", _port()]
    whole = _launch(accelerate, ["-m", "llmkit"], tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * 8
    # Sharded for real (not DDP in disguise): one model shard and one optimizer shard folder per checkpoint.
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in (tmp_path / "whole" / "checkpoint-2").iterdir()}
    assert not (tmp_path / "whole" / "checkpoint-2" / "model.safetensors").exists()

    # A recipe's trainer.fsdp, killed at step 5 (checkpoint-4 complete), resumed: the uninterrupted run's weights.
    killed = _torchrun(tmp_path / "killed", kill_at=5)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "summary.json").exists()
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _torchrun(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout + resumed.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    losses = [
        json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"] for run in ("whole", "killed")
    ]
    assert [h["loss"] for h in losses[0] if "loss" in h][-2:] == [h["loss"] for h in losses[1] if "loss" in h][-2:]

    # One process reads the run folder: a full model, no launch-time setting (fsdp, ddp_*) carried over.
    run = tmp_path / "killed"
    assert AutoModelForCausalLM.from_pretrained(run).num_parameters() == summary["parameters"]
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    evaluated = cli.invoke(app, ["evaluate", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    (tmp_path / "in.jsonl").write_text('{"text": "the king"}\n')
    predicted = cli.invoke(app, ["predict", str(run), "-i", "in.jsonl", "-o", "out.jsonl"])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads((tmp_path / "out.jsonl").read_text())["completion"]
    exported = cli.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "exported" / "model.safetensors").exists()
