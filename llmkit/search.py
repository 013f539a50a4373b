"""The `search:` section of a recipe: each key a dotted recipe key, each value its search space.

    search:
      trainer.learning_rate: {float: [1.0e-5, 1.0e-3], log: true}
      trainer.warmup_steps: {float: [0.0, 0.2]}
      trainer.per_device_train_batch_size: {choice: [16, 32, 64]}
      peft.r: {int: [4, 32], step: 4}

Parsed here without importing Optuna; `suggest` asks an Optuna trial for a value of each space. A space that
does not parse, or a key that is not a recipe key (checked by validating the recipe with each space's edge
values in place), is one line (RecipeError) before any trial runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit.errors import RecipeError, show

KINDS = ("float", "int", "choice")
_OPTIONS = {"float": ("log", "step"), "int": ("log", "step"), "choice": ()}


@dataclass(frozen=True)
class Space:
    key: str  # the dotted recipe key, e.g. trainer.learning_rate
    kind: str  # float | int | choice
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def edges(self) -> list:
        """The values that must all be valid recipe values: both bounds, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        extra = (", log" if self.log else "") + (f", step {self.step}" if self.step is not None else "")
        return f"{self.kind} in [{self.low}, {self.high}]{extra}"


def _number(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, int | float)


def parse_space(key: str, spec: Any) -> Space:
    """One search entry -> Space, or one line naming the key and the shape it should have."""
    where = f"search.{key}"
    usage = "e.g. {float: [1.0e-5, 1.0e-3], log: true}, {int: [4, 32]} or {choice: [16, 32]}"
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        raise RecipeError(f"{where}: give exactly one of float, int or choice, got {show(spec)}; {usage}")
    kind = next(k for k in spec if k in KINDS)
    unknown = [k for k in spec if k != kind and k not in _OPTIONS[kind]]
    if unknown:
        allowed = ", ".join(_OPTIONS[kind]) or "nothing"
        raise RecipeError(f"{where}: unknown option {unknown[0]!r} for a {kind} space (it takes {allowed}); {usage}")
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise RecipeError(f"{where}: choice takes a non-empty list of values, got {show(value)}")
        return Space(key, kind, choices=tuple(value))
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v, kind) for v in value)):
        raise RecipeError(f"{where}: {kind} takes [low, high] ({kind} numbers), got {show(value)}; {usage}")
    low, high = value
    log, step = spec.get("log", False), spec.get("step")
    if not low < high:
        raise RecipeError(f"{where}: low must be below high, got [{low}, {high}]")
    if log and low <= 0:
        raise RecipeError(f"{where}: a log space needs low > 0, got {low}")
    if step is not None and (log or not _number(step, kind) or step <= 0):
        raise RecipeError(f"{where}: step must be a positive {kind} (and not with log: true), got {show(step)}")
    return Space(
        key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high, bool(log), step
    )


def parse_search(search: Any) -> list[Space]:
    """The recipe's `search:` mapping -> Spaces (an empty or missing section is an error for `llmkit tune`)."""
    if not isinstance(search, dict) or not search:
        raise RecipeError(
            "llmkit tune needs a search: section, e.g. search: {trainer.learning_rate: {float: [1.0e-5, 1.0e-3], log: true}}"
        )
    spaces = dict(_flat(search, ""))  # a key given twice (dotted, then nested by an override): the later wins
    return [parse_space(key, spec) for key, spec in spaces.items()]


def _flat(mapping: dict, prefix: str) -> list[tuple[str, Any]]:
    """`trainer: {learning_rate: {float: ...}}` reads as `trainer.learning_rate: {float: ...}`."""
    out = []
    for key, spec in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not any(k in KINDS for k in spec):
            out += _flat(spec, f"{dotted}.")
        else:
            out.append((dotted, spec))
    return out


def suggest(trial: Any, space: Space) -> Any:
    """Ask an Optuna trial for this space's value (the parameter is named by the recipe key)."""
    if space.kind == "choice":
        return trial.suggest_categorical(space.key, list(space.choices))
    if space.kind == "int":
        return trial.suggest_int(space.key, space.low, space.high, step=space.step or 1, log=space.log)
    return trial.suggest_float(space.key, space.low, space.high, step=space.step, log=space.log)


def overrides(values: dict) -> list[str]:
    """key=value overrides (values as YAML flow) that put the values into a recipe."""
    import json

    return [f"{key}={json.dumps(value)}" for key, value in values.items()]
