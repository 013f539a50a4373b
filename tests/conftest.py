"""Test setup: offline, and every cache in a temporary folder so runs never touch the user's."""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

# Set before any test module imports datasets/transformers, which read these at import time.
_CACHE = Path(tempfile.mkdtemp(prefix="llmkit-test-cache-"))
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    LLMKIT_CACHE=str(_CACHE / "llmkit"),
    HF_DATASETS_CACHE=str(_CACHE / "datasets"),
    HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    DISABLE_TQDM="1",
)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def write(tmp_path):
    """Write a file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


@contextlib.contextmanager
def at_repo_root():
    """Inside the block, the working folder is the repository root (the tiny recipes name their fixtures
    relative to it); for module-scoped fixtures, which cannot use monkeypatch.chdir."""
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(here)
