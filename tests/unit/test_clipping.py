"""Gradient clipping on CPU: the norm and gradients of accelerate's clipping, without the multiply by 1."""

import types

import pytest
import torch
from accelerate.utils import DistributedType

from llmkit.clipping import SkipsUnitClip, clip_grad_norm


def _grads(scale: float) -> list:
    torch.manual_seed(0)
    shapes = [(30522, 8), (384, 384), (1536,), (2, 3, 5), (1,)]
    return [torch.randn(s) * scale for s in shapes]


def _accelerate_clip(grads: list, max_norm: float) -> torch.Tensor:
    """What accelerate does on CPU: torch's total norm over the gradients, stacked once more, then the clip."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    total = torch.linalg.vector_norm(torch.stack([get_total_norm(grads, 2.0)]), 2.0)
    clip_grads_with_norm_(params, max_norm, total)
    return total


@pytest.mark.parametrize("scale", [1e-3, 1.0])  # a norm below max_norm (nothing clipped) and far above it
def test_same_norm_and_gradients_as_accelerate(scale):
    ours, theirs = _grads(scale), _grads(scale)
    norm = clip_grad_norm(ours, 1.0)
    expected = _accelerate_clip(theirs, 1.0)
    assert torch.equal(norm, expected)  # bit for bit
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    if scale == 1.0:
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in ours])) == pytest.approx(1.0, rel=1e-4)


def test_the_multiply_runs_only_when_it_changes_something(monkeypatch):
    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    clip_grad_norm(_grads(1e-3), 1.0)
    assert calls == []  # factor 1: no pass over the gradients
    clip_grad_norm(_grads(1.0), 1.0)
    assert calls == [1]


def test_a_non_finite_norm_reaches_every_gradient_as_torchs_does():
    ours, theirs = _grads(1e-3), _grads(1e-3)
    ours[1][0, 0] = theirs[1][0, 0] = float("nan")
    assert torch.isnan(clip_grad_norm(ours, 1.0)) and torch.isnan(_accelerate_clip(theirs, 1.0))
    assert all(torch.isnan(g).all() for g in ours) and all(torch.isnan(g).all() for g in theirs)


class _Base:
    def _clip_grad_norm(self, model):
        return "the Trainer's own"


class _Trainer(SkipsUnitClip, _Base):
    def __init__(self, distributed_type, scaler=None):
        self.accelerator = types.SimpleNamespace(distributed_type=distributed_type, scaler=scaler)
        self.args = types.SimpleNamespace(max_grad_norm=1.0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    return model


def test_the_trainer_mixin_clips_one_cpu_process_and_ddp_on_cpu():
    grads = [p.grad for p in _model().parameters()]
    expected = _accelerate_clip(grads, 1.0)  # a norm of about 3.9: clipped
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU):
        model = _model()
        assert torch.equal(_Trainer(kind)._clip_grad_norm(model), expected)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA])
def test_everything_else_goes_to_the_trainers_clipping(kind):
    assert _Trainer(kind)._clip_grad_norm(_model()) == "the Trainer's own"
    assert _Trainer(DistributedType.NO, scaler=object())._clip_grad_norm(_model()) == "the Trainer's own"


class _Subclass(torch.Tensor):  # as a DTensor (tensor parallel) gradient is
    pass


def test_not_for_gradients_that_are_not_plain_cpu_tensors():
    model = _model()
    model.weight.grad = model.weight.grad.as_subclass(_Subclass)
    assert _Trainer(DistributedType.NO)._clip_grad_norm(model) == "the Trainer's own"


def test_the_trainer_class_has_it():
    from llmkit.engine import trainer_class
    from llmkit.tasks import get_task

    assert issubclass(trainer_class(get_task("ner")), SkipsUnitClip)
