"""Two CPU processes (torchrun, gloo), with LoRA, gradient accumulation, gradient checkpointing and bf16:
one output folder, world size 2, global batch reported right, eval gathered exactly."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, agree_but_for_near_ties

from llmkit import engine, rundir

pytestmark = pytest.mark.distributed


def test_torchrun_two_processes_matches_single_process_eval(tmp_path, monkeypatch):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port, so parallel CI jobs do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    recipe = ["-m", "llmkit", "finetune", "recipes/tiny/ner-lora.yaml", f"trainer.output_dir={out}"]
    settings = [
        "data.max_eval_samples=23",
        "trainer.num_train_epochs=1",
        "trainer.gradient_accumulation_steps=2",
        "trainer.gradient_checkpointing=true",
        "trainer.bf16=true",
    ]
    proc = subprocess.run(launch + recipe + settings, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every trainable parameter gets a gradient: DDP is not told to search for unused ones at every step.
    assert "find_unused_parameters=True was specified" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["global_batch_size"] == 2 * 16 * 2  # processes x per-device batch x accumulation
    assert summary["bf16"] is True and summary["trainable_parameters"] < summary["parameters"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert proc.stdout.count("Done in") == 1  # only rank 0 reports
    # The same model evaluated by one process: no eval sample dropped or counted twice by the gather.
    monkeypatch.chdir(ROOT)
    single = engine.evaluate(rundir.recipe_for_evaluation(out, []), "validation")
    assert single["samples"] == 23
    # Each of the 133 words of the first 23 validation sentences scored once on both sides (a sample the gather
    # duplicated, the 23rd's 6 words, would make it 139), the same predictions but for near ties.
    agree_but_for_near_ties(summary["final_metrics"]["eval_token_accuracy"], single["eval_token_accuracy"], 133)
    for key in ("eval_f1", "eval_precision", "eval_recall"):
        assert single[key] == pytest.approx(summary["final_metrics"][key], abs=0.1), key
    # The loss too (batches differ, so not to the bit): BERT's mean loss used to come out x world size.
    assert single["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=0.05)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(h["loss"] < 1.5 * single["eval_loss"] + 1 for h in history if "loss" in h)


@pytest.mark.parametrize(
    "config, flags",
    [
        ("cpu-2proc.yaml", []),
        # The 8-GPU config, sized to this machine on the command line: accelerate starts the processes with
        # torchrun, and llmkit, finding no GPU, trains on the CPU with gloo.
        ("multi-gpu.yaml", ["--num_processes", "2", "--mixed_precision", "no"]),
    ],
)
def test_accelerate_launch_with_a_shipped_config_runs_two_processes(tmp_path, config, flags):
    """`accelerate launch --config_file recipes/accelerate/CONFIG`, as the README says: world size 2."""
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{config}"]
    launch += [*flags, "--main_process_port", port, "-m", "llmkit", "finetune", "recipes/tiny/classification.yaml"]
    proc = subprocess.run(
        [*launch, f"trainer.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * 16
    assert proc.stdout.count("Done in") == 1  # only rank 0 reports


# At step LLMKIT_TEST_KILL_AT: with LLMKIT_TEST_KILL=all, every rank SIGKILLs the torchrun launcher's process group
# and then itself: what a scheduler does to a job, with checkpoint-4 complete and step 6 not. With
# LLMKIT_TEST_KILL=one, rank 1 alone dies, on torchrun's first attempt only: a worker lost, the launcher alive.
KILL = """
import os, signal, sys
import llmkit.interrupt as it
at, who = int(os.environ["LLMKIT_TEST_KILL_AT"]), os.environ["LLMKIT_TEST_KILL"]
step_end = it.StopOnSignal.on_step_end
def on_step_end(self, args, state, control, **kw):
    if state.global_step == at and who == "all":
        try:
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    if state.global_step == at and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return step_end(self, args, state, control, **kw)
it.StopOnSignal.on_step_end = on_step_end
from llmkit.cli import main
sys.argv = ["llmkit", *sys.argv[1:]]
main()
"""


def _torchrun(out, kill=None, extra=(), elastic=False):
    """The tiny GPT-2 recipe under torchrun, 2 processes; `kill`: see KILL; `elastic`: --max-restarts 1."""
    env = {}
    launch = ["torch.distributed.run", "--nproc_per_node", "2"]
    if elastic:  # what the README says for restarts: a fresh rendezvous store per attempt
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        launch += ["--standalone", "--max-restarts", "1"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            launch += ["--master_port", str(s.getsockname()[1])]
    return _launch(launch, out, kill, extra, env)


def _launch(launch, out, kill=None, extra=(), env=None):
    """The tiny GPT-2 recipe (6 steps, a checkpoint every 2) into `out`, under `python -m LAUNCH...`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if kill:
        env |= {"LLMKIT_TEST_KILL_AT": "5", "LLMKIT_TEST_KILL": kill}
    program = ["--no-python", sys.executable, "-c", KILL] if kill else ["-m", "llmkit"]
    settings = ["pretrain", "recipes/tiny/gpt2.yaml", f"trainer.output_dir={out}", "trainer.max_steps=6"]
    settings += ["trainer.save_steps=2", "trainer.save_total_limit=5", "trainer.logging_steps=1", *extra]
    return subprocess.run(
        [sys.executable, "-m", *launch, *program, *settings],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


def _same_run(tmp_path, a: str, b: str) -> None:
    """Runs a and b end with the same weights (< 1e-6) and log the same losses after step 4."""
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / a / "model.safetensors"), load_file(tmp_path / b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-6
    logs = [json.loads((tmp_path / r / "trainer_state.json").read_text())["log_history"] for r in (a, b)]
    losses = [{h["step"]: h["loss"] for h in log if "loss" in h and h["step"] > 4} for log in logs]
    assert losses[0] == losses[1] and losses[0]


def test_sigkill_of_a_two_process_run_then_resume_is_exact(tmp_path):
    whole = _torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", kill="all")
    assert killed.returncode != 0 and not (tmp_path / "killed" / "summary.json").exists()
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _torchrun(tmp_path / "killed", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(tmp_path, "whole", "killed")

    # torchrun --max-restarts 1, one worker SIGKILLed at step 5: the launcher restarts both workers, which
    # resume from checkpoint-4 by themselves (same command) and end where the uninterrupted run ended.
    restarted = _torchrun(tmp_path / "restarted", kill="one", elastic=True)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "torchrun restarted this worker (restart 1 of 1)" in restarted.stderr
    assert "Resuming the unfinished run" in restarted.stderr and "from checkpoint-4" in restarted.stderr
    _same_run(tmp_path, "whole", "restarted")


def test_torchrun_two_processes_distil_from_a_teacher(tmp_path, monkeypatch):
    """Each process runs its own teacher beside the DDP-wrapped student; one folder, one report, the student alone saved."""
    from llmkit.config import load_recipe, resolve

    monkeypatch.chdir(ROOT)
    teacher = tmp_path / "teacher"
    recipe = "recipes/tiny/classification.yaml"
    engine.train(resolve(load_recipe(recipe, [f"trainer.output_dir={teacher}", "model.config.num_hidden_layers=2"])))
    out = tmp_path / "student"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    settings = [
        f"trainer.output_dir={out}",
        "model.config=null",
        "tokenizer.train=null",
        "model.from_teacher.layers=[1]",
        f"distill.teacher={teacher}",
        "distill.hidden_loss=0.5",
        "trainer.gradient_accumulation_steps=2",
        "trainer.bf16=true",
    ]
    proc = subprocess.run(
        launch + ["-m", "llmkit", "finetune", recipe, *settings],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distill"]["teacher"] == str(teacher)
    assert summary["distill"]["teacher_metrics"]["eval_accuracy"] >= 0
    assert proc.stdout.count("Done in") == 1 and proc.stdout.count("distilled from") == 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    single = engine.evaluate(rundir.recipe_for_evaluation(out, []), "validation")
    assert single["samples"] == 24
    agree_but_for_near_ties(summary["final_metrics"]["eval_accuracy"], single["eval_accuracy"], 24)
