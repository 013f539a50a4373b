"""FSDP2 on two CPU processes (gloo): the shipped accelerate config and a recipe's trainer.fsdp shard for real,
checkpoints are sharded, a killed run resumes to the same weights, and the run folder holds one full model
that evaluate, predict and export use in one process."""

import json
import socket

import pytest
from test_two_processes import _launch, _same_run, _torchrun
from typer.testing import CliRunner

from llmkit.cli import app

pytestmark = pytest.mark.distributed

FSDP = ["trainer.fsdp=true", "trainer.fsdp_config={version: 2, state_dict_type: SHARDED_STATE_DICT}"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_fsdp_on_two_cpu_processes_shards_resumes_exactly_and_serves(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    # The shipped config, as its header says to run it on CPU: FSDP2, sharded checkpoints, 2 processes.
    accelerate = ["accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml"]
    accelerate += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", _port()]
    whole = _launch(accelerate, tmp_path / "whole", extra=["trainer.bf16=false"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * 8
    # Sharded for real (not DDP in disguise): one model shard and one optimizer shard folder per checkpoint.
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in (tmp_path / "whole" / "checkpoint-2").iterdir()}
    assert not (tmp_path / "whole" / "checkpoint-2" / "model.safetensors").exists()

    # A recipe's trainer.fsdp, killed at step 5 (checkpoint-4 complete), resumed: the uninterrupted run's weights.
    killed = _torchrun(tmp_path / "killed", kill="all", extra=[*FSDP, "trainer.bf16=false"])
    assert killed.returncode != 0 and not (tmp_path / "killed" / "summary.json").exists()
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _torchrun(tmp_path / "killed", extra=[*FSDP, "trainer.bf16=false", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout + resumed.stderr
    _same_run(tmp_path, "whole", "killed")

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
