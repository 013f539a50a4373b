"""Gradient-norm clipping on CPU without a pass over every gradient when nothing is clipped.

The Trainer clips through accelerate, which calls `torch.nn.utils.clip_grad_norm_`'s parts: on CPU (no
foreach kernels there) one Python-level norm per parameter, then every gradient multiplied by
min(1, max_norm / (norm + 1e-6)), also when that factor is exactly 1, as it is whenever the norm is at most
max_norm: one more read and write of all gradients (MiniLM: 91 MB) on such steps for nothing. Here the norms are
one foreach call, the same per-tensor norms reduced the same way (the same total, bit for bit), and the
multiply runs only when the factor is not 1 (below 1, or not a number: a non-finite norm still reaches
every gradient, as torch's does). Same norm, same gradients, tested against accelerate's.

Only where accelerate itself would call that function: parameters on the CPU, no fp16 loss scaler, and no
FSDP, DeepSpeed, XLA or tensor-parallel (DTensor) gradients; everything else goes to the Trainer's own.
"""

from __future__ import annotations

from typing import Any

from llmkit.memory import scale_gradients


def clip_grad_norm(grads: list, max_norm: float) -> Any:
    """Clip `grads` in place to a total 2-norm of `max_norm`; returns the norm before clipping."""
    import torch

    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    # reduced as accelerate reduces them (torch's total norm, then the norm of that one value): the same bits
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(torch.stack(norms), 2.0)]), 2.0)
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if not bool(factor == 1.0):  # a factor of 1 changes nothing; NaN compares unequal and still goes through
        scale_gradients(grads, factor)  # torch._foreach_mul_, but only the rows of the embedding gradient in use
    return total


class SkipsUnitClip:
    """Trainer mixin: `_clip_grad_norm` through `clip_grad_norm` above where that is the same computation."""

    def _clip_grad_norm(self, model: Any) -> Any:
        grads = _plain_cpu_grads(self, model)
        if grads is None:
            return super()._clip_grad_norm(model)
        return clip_grad_norm(grads, float(self.args.max_grad_norm))


def _plain_cpu_grads(trainer: Any, model: Any) -> list | None:
    """The model's gradients where accelerate would clip them with torch's plain function on CPU; else None."""
    import torch
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    plain = (DistributedType.NO, DistributedType.MULTI_CPU)
    if accelerator.distributed_type not in plain or getattr(accelerator, "scaler", None) is not None:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if any(g.device.type != "cpu" or type(g) is not torch.Tensor or g.is_sparse for g in grads):
        return None  # DTensor (tensor parallel), a GPU, or sparse gradients: the Trainer's way
    return grads
