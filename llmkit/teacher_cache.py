"""The teacher's logits kept per training example, so that from the second epoch on a distillation step costs
what a plain step of the student costs: the teacher is frozen and in eval mode, so an example's logits are the
same every time it comes back.

An example is found by its content (a hash of its real tokens, token types and labelled positions), not by its
place in the data: shuffling, length grouping, dynamic padding and resumed runs all find it. Only where the
inputs repeat (not MLM, whose collator draws new masks every time: Task.random_inputs), without the hidden-state
loss (whole hidden states are too big to keep), and for outputs of at most MAX_CLASSES per row (labels, not a
vocabulary); at most LIMIT_BYTES in all, after which new examples are no longer kept. Each checkpoint holds the
cache of each process (`teacher_logits_R.pt`), so a resumed run reads the same logits as the run it continues
(the teacher recomputing them in other batches could differ in the last bf16 bit).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("llmkit")

MAX_CLASSES = 4096
LIMIT_BYTES = 1 << 30
STATE = "teacher_logits_{}.pt"  # in each checkpoint, one per process
IGNORE = -100


class TeacherCache:
    def __init__(self, limit_bytes: int = LIMIT_BYTES) -> None:
        self.rows: dict[bytes, Any] = {}
        self.size = 0
        self.limit = limit_bytes
        self.hits = self.misses = 0
        self.off = False  # outputs too wide to keep (a vocabulary): no keys computed any more

    def keys(self, inputs: dict) -> list[bytes]:
        """One key per row of the batch: its real tokens (attention mask), token types and labelled positions."""
        mask = inputs["attention_mask"].bool().cpu()  # one copy from the device per batch, not one per row
        parts = [inputs["input_ids"], inputs.get("token_type_ids")]
        labels = inputs.get("labels")
        if labels is not None and labels.shape == mask.shape:
            parts.append(labels != IGNORE)
        parts = [part.cpu().numpy() for part in parts if part is not None]
        keys = []
        for row, real in enumerate(mask.numpy()):
            digest = hashlib.blake2b(digest_size=16)
            for part in parts:
                digest.update(part[row][real].tobytes())
            keys.append(digest.digest())
        return keys

    def lookup(self, keys: list[bytes], inputs: dict) -> Any:
        """The batch's teacher logits ([B, C], or [B, T, C] with zeros at padding) when every row is kept, else None."""
        import torch

        rows = [self.rows.get(key) for key in keys]
        if any(row is None for row in rows):
            self.misses += 1
            return None
        self.hits += 1
        device = inputs["input_ids"].device
        if rows[0].dim() == 1:  # one row of logits per sequence
            return torch.stack(rows).to(device)
        mask = inputs["attention_mask"].bool().cpu()  # one copy from the device, not one per row
        out = torch.zeros((*mask.shape, rows[0].shape[-1]), dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            out[i][mask[i]] = row
        return out.to(device)

    def store(self, keys: list[bytes], logits: Any, inputs: dict) -> None:
        if self.size >= self.limit:
            return
        mask = inputs["attention_mask"].bool()
        for i, key in enumerate(keys):
            if key in self.rows:  # kept already (a repeated example, or one of a batch that missed): as it was
                continue
            row = logits[i] if logits.dim() == 2 else logits[i][mask[i]]
            self._keep(key, row.detach().to("cpu", copy=True))
        if self.size >= self.limit:
            log.info(
                "teacher logits: %d examples kept (%d MB); later ones are run each time",
                len(self.rows),
                self.size >> 20,
            )

    def save(self, folder: Path, process: int) -> None:
        import torch

        torch.save(self.rows, folder / STATE.format(process))

    def load(self, checkpoint: Path) -> None:
        """Every process's cache of a checkpoint (keys are contents: merging them is safe, whatever the processes)."""
        import torch

        for path in sorted(checkpoint.glob(STATE.format("*"))):
            for key, row in torch.load(path, weights_only=True).items():
                if key not in self.rows:
                    self._keep(key, row)

    def _keep(self, key: bytes, row: Any) -> None:
        self.rows[key] = row
        self.size += row.numel() * row.element_size() + len(key)


def wanted(recipe: Any, task: Any, teacher: Any) -> bool:
    """Whether a distillation run keeps its teacher's logits: not where the teacher's head predicts words (a
    language model's vocabulary; the width is checked again at the first batch)."""
    d = recipe.distill
    if d is None or d.alpha == 0 or d.hidden_loss > 0 or not d.cache or task.random_inputs:
        return False
    words = getattr(teacher, "get_output_embeddings", lambda: None)()
    return words is None


def teacher_logits(cache: TeacherCache | None, teacher: Any, inputs: dict) -> tuple[Any, Any]:
    """(the teacher's logits for this batch, its whole output or None when the logits came from the cache)."""
    import torch

    keys = cache.keys(inputs) if cache is not None and not cache.off and "attention_mask" in inputs else None
    if keys is not None and (logits := cache.lookup(keys, inputs)) is not None:
        return logits, None
    with torch.no_grad():
        taught = teacher(**inputs)
    if keys is not None:
        cache.off = taught.logits.shape[-1] > MAX_CLASSES
        if not cache.off:
            cache.store(keys, taught.logits, inputs)
    return taught.logits, taught


class KeepsTeacherLogits:
    """Trainer mixin: the cache (`self.teacher_cache`, or None) goes into each checkpoint and comes back on resume."""

    teacher_cache: TeacherCache | None = None

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        if self.teacher_cache is not None and isinstance(resume_from_checkpoint, (str, Path)):
            self.teacher_cache.load(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.teacher_cache is not None:
            self.teacher_cache.save(Path(output_dir), self.args.process_index)
