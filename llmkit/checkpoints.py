"""Atomic checkpoints: a checkpoint folder is either complete or absent, never half-written.

The Trainer writes `checkpoint-N` file by file (weights, optimizer, scheduler, RNG states, and
trainer_state.json last). A kill or a full disk in the middle used to leave a folder that looked
like a checkpoint. Here every checkpoint is written into `output_dir/.partial/checkpoint-N` and
renamed into place once every rank has finished writing; only then are old checkpoints rotated
out (`save_total_limit`), so the last good checkpoint is never deleted before the new one is
complete. A leftover `.partial` (from a killed save) is ignored by resume and cleared by the next
save.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError, first_line

log = logging.getLogger("llmkit")

STAGING = ".partial"
PREFIX = "checkpoint-"


MANIFEST = "manifest.json"  # in each checkpoint: every file's size and sha256, written last before the rename


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoint folders (`checkpoint-N` holding trainer_state.json) in `out`, newest first."""
    found = []
    for p in Path(out).glob(PREFIX + "*"):
        suffix = p.name[len(PREFIX) :]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").exists():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(out: Path, verified: bool = False) -> Path | None:
    """The newest complete checkpoint in `out`; with verified=True the newest whose files match its manifest
    (a damaged one is skipped with a warning naming what was wrong)."""
    for ckpt in checkpoints(out):
        problem = damage(ckpt) if verified else None
        if problem is None:
            return ckpt
        log.warning("%s is damaged (%s): skipped, resuming from an older checkpoint", ckpt, problem)
    return None


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record every file of a checkpoint (size, sha256): the proof, checked at resume, that it is intact."""
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)
    }
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint against its manifest (a missing, truncated or changed file), or None.

    A checkpoint without a manifest (written by an older llmkit) is taken as it is.
    """
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"unreadable {MANIFEST}"
    for name, expected in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} when saved"
        if _sha256(path) != expected["sha256"]:
            return f"{name} changed since it was saved (sha256 differs)"
    return None


def save_failed(what: str, where: Path, err: Exception) -> LlmkitError:
    """One line for a save that failed on the file system (disk full, read-only, permissions)."""
    code = getattr(err, "errno", None)
    text = getattr(err, "strerror", None) or first_line(err)
    if code == errno.ENOSPC or "No space left" in str(err):  # safetensors and torch.save report it as text
        fix = (
            f"free space on the disk holding {where} (or set trainer.save_total_limit lower), then resume with --resume"
        )
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {where} writable or choose another trainer.output_dir"
    else:
        fix = "check the output folder, then resume with --resume"
    return LlmkitError(f"could not save {what} in {where}: {text}; {fix}")


def is_save_error(err: Exception) -> bool:
    """A file-system failure while writing: OSError, or the text safetensors/torch.save wrap it in."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "Read-only file system", "Permission denied", "Disk quota"))


@contextmanager
def saving(what: str, where: Path, partial: Path | None = None) -> Iterator[None]:
    """Turn a file-system failure inside the block into one line (save_failed); remove `partial` then."""
    try:
        yield
    except Exception as err:
        if not is_save_error(err):
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise save_failed(what, where, err) from err


def drop_pickled_args(folder: Path) -> None:
    """Remove the Trainer's training_args.bin: a pickle, which only an unsafe torch.load could read.

    Nothing reads it back (resume uses trainer_state.json; the run's settings are in recipe.yaml),
    and a run folder that holds only safetensors, JSON and YAML can be shared without risk.
    """
    (Path(folder) / "training_args.bin").unlink(missing_ok=True)


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpoints:
    """Trainer mixin: write each checkpoint into a staging folder, then rename it into place."""

    _staging_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _wait(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX}{self.state.global_step}"
        staging = run_dir / STAGING
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # a save killed earlier: never resumed from
        self._wait()
        self._staging_dir = str(staging)
        try:
            with saving(f"checkpoint {name}", run_dir, partial=staging):
                super()._save_checkpoint(model, trial)  # into .partial/checkpoint-N; rotates nothing there
        finally:
            self._staging_dir = None
        self._wait()  # every rank has written its RNG state
        if self.args.should_save:
            staged, final = staging / name, run_dir / name
            drop_pickled_args(staged)
            if self.state.best_model_checkpoint == str(staged):
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            if (run_dir / "recipe.yaml").exists():  # self-describing: `llmkit evaluate RUN/checkpoint-N` works
                shutil.copy2(run_dir / "recipe.yaml", staged / "recipe.yaml")
            write_manifest(staged)  # last: a checkpoint with a manifest was written whole
            if final.exists():  # the same step saved again: move the old copy aside, never lose both
                os.replace(final, staging / f"{name}.old")
            os.replace(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            _sync_dir(run_dir)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self._wait()


def trainer_with_atomic_checkpoints(base: type) -> type:
    """`base` (Trainer or Seq2SeqTrainer) with atomic checkpoint saves."""
    return type(base.__name__, (AtomicCheckpoints, base), {})
