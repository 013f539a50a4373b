"""Files llmkit writes: atomic text and JSON writes, and the cache folder for what it derives once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    """Write a text file through a temporary name and a rename: never seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically (values JSON cannot hold are written as strings)."""
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def cache_dir() -> Path:
    """Where llmkit keeps what it derives once and reuses (built-in corpora, trained tokenizers)."""
    root = os.environ.get("LLMKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmkit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
