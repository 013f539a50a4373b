"""The exceptions llmkit raises for problems the user can fix (exit code 2)."""


class LlmkitError(Exception):
    """A recipe, usage or data problem: reported as one line on stderr, exit code 2."""


class RecipeError(LlmkitError):
    """The recipe (file, extends chain or overrides) is invalid."""


class DataError(LlmkitError):
    """The data named by the recipe is missing, empty or malformed."""


class Interrupted(Exception):  # noqa: N818 - it is not an error: the user asked to stop
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit code 130)."""


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (library errors can run to pages), or `default`
    (the exception's type name) when it has none; never fails on an empty message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (type(e).__name__ if default is None else default)
