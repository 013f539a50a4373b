"""Process memory: glibc's allocator settings, and the word-embedding gradient kept in one buffer across steps."""

from __future__ import annotations

import os
import types
from typing import Any

MMAP_THRESHOLD = 32 << 20  # the largest M_MMAP_THRESHOLD every glibc accepts: blocks above it are always fresh pages


def keep_freed_memory() -> None:
    """glibc: reuse freed blocks below 32 MiB instead of returning them to the kernel.

    Training frees and reallocates the same activation-sized blocks every step. By default glibc
    hands blocks above a moving threshold back with munmap/trim, and each step then pays page faults
    to get them again: ~10% of a T5 step on CPU. M_MMAP_THRESHOLD=32 MiB (the most every glibc
    accepts; larger blocks still go back) and M_TRIM_THRESHOLD=1 GiB keep them. The trim setting is
    made only once the threshold is accepted: on its own it freezes the threshold at 128 KiB, which
    halves speed. LLMKIT_MALLOC=default opts out; other C libraries (musl, macOS) are left alone.
    """
    import platform

    if platform.libc_ver()[0] != "glibc" or os.environ.get("LLMKIT_MALLOC") == "default":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, MMAP_THRESHOLD) == 1:  # M_MMAP_THRESHOLD; mallopt returns 1 on success
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rows_written(kept: dict, buffer: Any) -> list | None:
    """The row indices the lookups added to the kept buffer since it was last zeroed, where nothing else has written
    to it since (its version counter says so); None where other rows may be non-zero too."""
    rows = kept.get("rows")
    return rows if rows is not None and buffer._version == kept.get("version") else None


def _zeroed(kept: dict, weight: Any) -> Any:
    """The kept gradient buffer, zero again: only the rows the lookups added to since it was last zeroed, where
    nothing else has written to it since (its version counter says so), else all of it (a clipping multiply by a
    non-finite factor, say, reaches every row). A batch touches a few hundred of MiniLM's 30,522 rows: re-zeroing
    those instead of 47 MB is ~2 ms a step on this project's CPU."""
    import torch

    buffer = kept.get("buffer")
    if buffer is None:
        buffer = kept["buffer"] = torch.zeros_like(weight)
        buffer._llmkit_kept = kept  # for scale_gradients
    elif (rows := _rows_written(kept, buffer)) is not None:
        if rows:
            buffer.index_fill_(0, torch.cat(rows), 0)
    else:
        buffer.zero_()
    kept["rows"], kept["version"] = [], buffer._version
    return buffer


def scale_gradients(grads: list, factor: Any) -> None:
    """`grads` *= `factor` in place (gradient clipping), as `torch._foreach_mul_` does it, except a kept embedding
    gradient whose untouched rows are known to be zero: only the rows the lookups added to are multiplied there
    (0 x a finite factor is 0: the same values, bit for bit), not all 47 MB; its row-wise re-zero then stays. A NaN
    factor (a NaN norm) reaches every row, as torch's does, and the next re-zero is whole."""
    import math

    import torch

    finite, rest = math.isfinite(float(factor)), []
    for g in grads:
        kept = getattr(g, "_llmkit_kept", None)
        if finite and kept is not None and _rows_written(kept, g):
            rows = torch.cat(kept["rows"]).unique()
            g.index_copy_(0, rows, g.index_select(0, rows).mul_(factor))
            kept["version"] = g._version
        else:
            rest.append(g)
    if rest:  # empty where the embedding is the only thing training
        torch._foreach_mul_(rest, factor)


def _lookup() -> Any:
    import torch
    import torch.nn.functional as F

    class Lookup(torch.autograd.Function):
        """F.embedding whose backward adds the rows' gradients into `weight.grad` itself (the kept buffer, zeroed,
        where the Trainer set it to None), instead of returning a new dense [vocabulary, width] gradient."""

        @staticmethod
        def forward(ctx: Any, ids: Any, weight: Any, padding_idx: Any, kept: dict) -> Any:
            ctx.save_for_backward(ids)
            ctx.weight, ctx.padding_idx, ctx.kept = weight, padding_idx, kept
            return F.embedding(ids, weight, padding_idx)

        @staticmethod
        def backward(ctx: Any, upstream: Any) -> Any:
            (ids,) = ctx.saved_tensors
            weight, rows, kept = ctx.weight, ids.reshape(-1), ctx.kept
            grads = upstream.reshape(-1, upstream.shape[-1]).to(weight.dtype)
            if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
                real = rows != ctx.padding_idx
                rows, grads = rows[real], grads[real]
            if weight.grad is None:
                weight.grad = _zeroed(kept, weight)
            mine = weight.grad is kept.get("buffer")
            if mine and weight.grad._version != kept["version"]:
                kept["rows"] = None  # written to by something else since (accumulating): zero all of it next time
            weight.grad.index_add_(0, rows, grads)
            if mine:
                if kept["rows"] is not None:
                    kept["rows"].append(rows)
                kept["version"] = weight.grad._version
            return None, None, None, None

    return Lookup


def reuse_embedding_gradient(model: Any) -> bool:
    """Keep the input embedding's gradient in one buffer across steps when it is larger than glibc will reuse.

    A fine-tuned model's word embedding gets a dense [vocabulary, width] gradient every step (MiniLM: 30,522 x 384,
    47 MB), allocated with fresh pages (above MMAP_THRESHOLD), page-faulted in while zero-filled, and unmapped when
    the Trainer sets the gradients to None: ~11 ms of a ~170 ms SST-2 step on this project's CPU. Here the lookup's
    backward adds the batch's rows into the parameter's `.grad` directly, which it sets to a kept, zeroed buffer
    where it is None: the same gradient without the fresh pages. Only for a plain nn.Embedding that trains (not
    under LoRA, max_norm, scale_grad_by_freq or sparse) and in one process: DDP and FSDP reduce the gradients
    that autograd accumulates, which this bypasses. Returns whether it was installed.
    """
    import torch

    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad or emb.weight.device.type != "cpu":
        return False
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return False
    if emb.weight.numel() * emb.weight.element_size() <= MMAP_THRESHOLD:
        return False
    lookup = _lookup()

    def forward(self: Any, ids: Any) -> Any:  # bound to the module: a deep copy calls its own weight
        return lookup.apply(ids, self.weight, self.padding_idx, self._llmkit_kept_grad)

    emb._llmkit_kept_grad = {}
    emb.forward = types.MethodType(forward, emb)
    return True
