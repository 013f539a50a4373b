"""The stop flag of a distributed run travels on a CPU (gloo) group, never on the GPUs' NCCL group."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from llmkit.interrupt import StopOnSignal


@pytest.fixture
def collectives(monkeypatch):
    """A fake process group of backend `backend`: records group creations and all-reduces (summing 1 peer)."""
    seen = {"groups": [], "reduces": []}

    def new_group(backend=None, **kwargs):
        seen["groups"].append(backend)
        return f"{backend}-group"

    def all_reduce(tensor, group=None, **kwargs):
        seen["reduces"].append((tensor.device.type, group))
        tensor += 1.0 if seen.get("peer_requested") else 0.0

    def no_device_sync(*args, **kwargs):
        raise AssertionError("the stop flag synchronised the device")

    monkeypatch.setattr(dist, "new_group", new_group)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    return seen


@pytest.mark.parametrize(("backend", "group"), [("nccl", "gloo-group"), ("gloo", None)])
def test_the_flag_is_reduced_on_a_cpu_group(monkeypatch, collectives, backend, group):
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    stopper = StopOnSignal(world_size=2)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    stopper.on_train_begin(None, None, control)
    assert collectives["groups"] == (["gloo"] if backend == "nccl" else [])  # made once, before the first step
    for _ in range(3):  # steps without a signal: nothing changes, nothing waits for a device
        stopper.on_step_end(None, None, control)
    assert not control.should_training_stop
    assert collectives["reduces"] == [("cpu", group)] * 3
    collectives["peer_requested"] = True  # another rank got the signal: this one stops at the same step
    stopper.on_step_end(None, None, control)
    assert control.should_save and control.should_training_stop and stopper.stopped
    assert collectives["groups"] == (["gloo"] if backend == "nccl" else [])  # still only the one group
