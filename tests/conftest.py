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


def agree_but_for_near_ties(gathered: float, alone: float, count: int, flips: int = 2) -> None:
    """A fraction of `count` items (an accuracy) from a multi-process evaluation and from one process: both whole
    numbers of items out of `count` (none dropped, none counted twice by the gather's padding: another count would
    put another denominator under it), apart by at most `flips` items. Not to the bit: under bf16 autocast the
    batches' other shapes round differently, which can flip a near tie of a barely trained tiny model (CI saw one
    word of 133 flip; in fp32 both agree)."""
    items = [fraction * count for fraction in (gathered, alone)]
    assert all(abs(n - round(n)) < 1e-6 for n in items), (items, count)
    assert abs(round(items[0]) - round(items[1])) <= flips, (items, count)
