"""The exceptions llmkit raises for problems the user can fix (exit code 2), and how their messages are worded."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from typing import Any


class LlmkitError(Exception):
    """A recipe, usage or data problem: reported as one line on stderr, exit code 2."""


class RecipeError(LlmkitError):
    """The recipe (file, extends chain or overrides) is invalid."""


class DataError(LlmkitError):
    """The data named by the recipe is missing, empty or malformed."""


class Interrupted(Exception):  # noqa: N818 - it is not an error: the user asked to stop
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit code 130)."""


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, a request to stop, not an error
    """SIGTERM outside training (exit code 130).

    Not a KeyboardInterrupt: CPython marks a KeyboardInterrupt raised inside exec()'d code (dataclass
    creation while a library imports) as unhandled even once caught, and the process then ends by SIGINT.
    """


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (library errors can run to pages), or `default`
    (the exception's type name) when it has none; never fails on an empty message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (type(e).__name__ if default is None else default)


def suggest(key: str, valid: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest valid key, or ''."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def show(value: Any, limit: int = 80) -> str:
    """repr() of a value from the recipe, cut short: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def offline_hint() -> str:
    """' (offline mode)' when the Hugging Face Hub is switched off: the likely reason a model cannot be loaded."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return " (offline mode)"
    return ""
