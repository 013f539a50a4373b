"""Two processes reading one stream (data.streaming): each block of one pass is trained on exactly once."""

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT

from llmkit import streams
from llmkit.config import load_recipe, resolve
from llmkit.tasks import get_task

pytestmark = pytest.mark.distributed

# The CLI under torchrun, each rank writing a hash of every block it trains on to $LLMKIT_TEST_BLOCKS/rank-R.json.
RECORD = """
import atexit, hashlib, json, os, sys
import transformers
seen, step = [], transformers.Trainer.training_step
def training_step(self, model, inputs, *a, **kw):
    seen.extend(hashlib.sha1(str(r).encode()).hexdigest() for r in inputs["input_ids"].tolist())
    return step(self, model, inputs, *a, **kw)
transformers.Trainer.training_step = training_step
atexit.register(lambda: open(os.path.join(os.environ["LLMKIT_TEST_BLOCKS"], f"rank-{os.environ['RANK']}.json"), "w").write(json.dumps(seen)))
from llmkit.cli import main
sys.argv = ["llmkit", *sys.argv[1:]]
main()
"""


def _settings(tmp_path, files):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(files):  # equal lengths: every process gets as many blocks
        lines = "".join(f"text {'ab'[f]} line {i} of {' '.join(['w'] * (i % 5))} end\n" for i in range(104 // files))
        (folder / f"part-{f}.txt").write_text(lines, encoding="utf-8")
    (tmp_path / "val.txt").write_text("held out text of the validation\n" * 20, encoding="utf-8")
    return [
        f"trainer.output_dir={tmp_path / 'run'}",
        f"data.train={folder}/*.txt",
        f"data.validation={tmp_path / 'val.txt'}",
        "data.source=null",
        "data.streaming=true",
        "data.max_train_samples=null",
        "trainer.eval_strategy=no",
        "trainer.save_strategy=no",
    ]


def _one_pass(recipe, rank):
    """The blocks process `rank` of 2 reads in one pass over the stream (it repeats: up to its first block again)."""
    args = SimpleNamespace(world_size=2, process_index=rank, max_steps=1)
    _, tokenized, _ = streams.load(recipe, get_task("clm"), args)
    hashes = (hashlib.sha1(str(b["input_ids"]).encode()).hexdigest() for b in tokenized["train"])
    first = next(hashes)
    return [first, *itertools.takewhile(lambda h: h != first, itertools.islice(hashes, 10_000))]


@pytest.mark.parametrize("files", [2, 1], ids=["a-file-per-process", "one-file-every-other-block"])
def test_two_processes_train_each_block_of_a_pass_once(tmp_path, monkeypatch, files):
    settings = _settings(tmp_path, files)
    monkeypatch.chdir(ROOT)
    recipe = resolve(load_recipe("recipes/tiny/gpt2.yaml", settings))
    passes = [_one_pass(recipe, rank) for rank in (0, 1)]
    assert len(passes[0]) == len(passes[1]) > 8, [len(p) for p in passes]
    batch = next(b for b in (4, 3, 2) if len(passes[0]) % b == 0)  # a pass is a whole number of steps
    steps = len(passes[0]) // batch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_TEST_BLOCKS": str(tmp_path)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    run = [*launch, "--no-python", sys.executable, "-c", RECORD, "pretrain", "recipes/tiny/gpt2.yaml"]
    proc = subprocess.run(
        [*run, *settings, f"trainer.max_steps={steps}", f"trainer.per_device_train_batch_size={batch}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert trained == passes  # each process its own part, in order, whole
    assert not set(trained[0]) & set(trained[1])  # no block on both
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


def test_a_killed_two_process_stream_resumes_where_each_process_was(tmp_path):
    """SIGKILL of both ranks at step 5, then --resume: each process restores its own stream position (checkpoint-4)
    and the run ends as the uninterrupted one did."""
    from test_two_processes import _same_run, _torchrun

    stream = ["data.streaming=true", "data.max_train_samples=null"]
    whole = _torchrun(tmp_path / "whole", extra=stream)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", kill="all", extra=stream)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoint-4").glob("stream_state_*")) == [
        "stream_state_0.pt",
        "stream_state_1.pt",
    ]
    resumed = _torchrun(tmp_path / "killed", extra=[*stream, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Stream position restored" in resumed.stderr
    _same_run(tmp_path, "whole", "killed")
