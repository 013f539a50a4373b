"""The recipe schema: llmkit's own sections as dataclasses, their types and checks. It never imports the tasks:
a task's `options:` are checked by whoever knows the task (config.validate)."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import RecipeError, first_line, show, suggest

# --------------------------------------------------------------------------- schema


@dataclass
class ModelSection:
    name_or_path: str | None = None  # a Hub id or local folder to load weights from
    config: dict | None = None  # AutoConfig.for_model(**config) to build from scratch
    encoder: str | None = None  # encoder-decoder warm start (summarization)
    decoder: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 | ...; None: transformers' choice
    fast_dropout: bool = True  # CPU training: dropout masks from 16 random bits (llmkit/fastdropout.py); false: torch's
    skip_positions: bool | None = None  # compute only where the loss reads (unpad.py, mlm/classification heads); unset:
    # yes but on TPU (XLA: fixed shapes); false: every position
    quantization: dict | None = None  # transformers.BitsAndBytesConfig kwargs (QLoRA): needs CUDA + bitsandbytes
    from_teacher: FromTeacherSection | None = None  # the student: the teacher's architecture with some of its layers


@dataclass
class FromTeacherSection:
    layers: list[int] = field(
        default_factory=list
    )  # the teacher's layers the student keeps (weights copied), e.g. [0, 2, 4]


@dataclass
class DistillSection:
    """Knowledge distillation: train against a teacher's outputs as well as the labels (llmkit/distill.py)."""

    teacher: str | None = None  # a finished llmkit run folder (LoRA runs too), a checkpoint folder or a Hub id
    temperature: float = 2.0  # softens both distributions; the soft loss is multiplied by its square
    alpha: float = 0.5  # weight of the soft loss (KL to the teacher); the task's own loss keeps 1 - alpha
    hidden_loss: float = 0.0  # weight of 1 - cosine between the last hidden states (needs equal widths); 0: off
    cache: bool = True  # keep the teacher's logits per example where inputs repeat: later epochs skip the teacher


@dataclass
class TuneSection:
    """`llmkit tune`: how the search over the recipe's `search:` section runs (llmkit/tune.py)."""

    objective: str | None = None  # a metric of the final evaluation (default: the task's main metric)
    direction: str | None = None  # maximize | minimize (default: minimize losses and perplexities)
    sampler: str = "tpe"  # tpe | random
    pruner: str = "median"  # median (a trial behind the median at an evaluation stops) | none
    trials: int = 10  # finished trials the study should reach (`--trials` overrides)
    seed: int | None = None  # the sampler's seed
    study: str | None = None  # the study's name (default: the output folder's name)
    storage: str | None = None  # an Optuna RDB URL (default: sqlite:///OUTPUT_DIR/study.db)


@dataclass
class TokenizerTrainSection:
    type: str = "wordpiece"  # wordpiece | bpe | unigram
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = False
    max_texts: int | None = None  # train on at most this many texts (None: the whole train split)


@dataclass
class TokenizerSection:
    name_or_path: str | None = None
    train: TokenizerTrainSection | None = None


@dataclass
class DataSection:
    load: dict | None = None  # kwargs for datasets.load_dataset
    source: str | None = None  # built-in corpus: "pydoc"
    train: str | list[str] | None = None
    validation: str | list[str] | None = None
    test: str | list[str] | None = None
    columns: dict = field(default_factory=dict)
    validation_split: float = 0.05
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    max_target_length: int = 64
    on_bad_rows: str = "error"  # error | skip | warn
    num_proc: int | None = None
    streaming: bool = False  # pretraining: read the corpus as it trains (llmkit/streams.py), never whole in memory
    prepared: str | None = None  # a folder written by `llmkit prepare`: tokenized blocks reused as they are

    def files(self, split: str) -> list[str]:
        """The local files named for a split (data.train and friends take one path or a list, or a glob such as
        corpus/*.txt, expanded in sorted order; a pattern that matches nothing is kept, for the error to name)."""
        import glob

        value = getattr(self, split, None)
        paths = [] if value is None else [value] if isinstance(value, str) else list(value)
        out = []
        for p in paths:
            matches = sorted(glob.glob(p)) if isinstance(p, str) and any(c in p for c in "*?[") else []
            out += matches or [p]
        return out


@dataclass
class Recipe:
    """A validated recipe. `raw` keeps the merged dict (what `recipe show` prints and runs save)."""

    task: str
    description: str = ""  # what this run is for, in a line: the model card says it under its title
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    options: Any = None  # the task's own Options dataclass (a plain mapping until the task checks it)
    trainer: dict = field(default_factory=dict)  # -> transformers.TrainingArguments
    peft: dict | None = None  # -> peft.LoraConfig
    generation: dict | None = None  # -> transformers.GenerationConfig
    metrics: list[str] = field(default_factory=list)
    distill: DistillSection | None = None
    search: dict | None = None  # `llmkit tune`: dotted recipe key -> search space (llmkit/search.py)
    tune: TuneSection | None = None
    raw: dict = field(default_factory=dict, repr=False)
    recipe_file: str = ""
    # Built by config.resolve(): the Hugging Face objects the sections above describe.
    args: Any = field(default=None, repr=False)  # TrainingArguments / Seq2SeqTrainingArguments
    lora: Any = field(default=None, repr=False)  # peft.LoraConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer["output_dir"])


_INTERNAL = ("raw", "recipe_file", "args", "lora")
_NESTED = {
    ModelSection,
    TokenizerSection,
    TokenizerTrainSection,
    DataSection,
    FromTeacherSection,
    DistillSection,
    TuneSection,
}


_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}


def _type_name(tp: Any) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }
    if tp in names:
        return names[tp]
    if tp in _NESTED:
        return "a mapping (key: value)"
    origin = typing.get_origin(tp)
    if origin is dict:
        return "a mapping"
    if origin is list:
        inner = typing.get_args(tp)
        return f"a list of {_PLURAL[inner[0]]}" if inner and inner[0] in _PLURAL else "a list"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(_type_name(a) for a in args) if args else getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, dotted: str) -> None:
    """RecipeError unless `value` fits `tp`; NaN and infinity are never a setting."""
    if not check_type(value, tp):
        raise RecipeError(f"{dotted} must be {_type_name(tp)}, got {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{dotted} must be a finite number, got {value}")


def check_type(value: Any, tp: Any) -> bool:
    """True when `value` (from YAML) fits the annotation `tp` (simple types, unions, lists)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(check_type(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def build_section(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from a YAML mapping, rejecting unknown keys and wrong types by path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must be a mapping (key: value), got {show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise RecipeError(f"unknown key {show(dotted)}{suggest(str(key), names)}")
        tp = hints[key]
        nested = [a for a in (tp, *typing.get_args(tp)) if a in _NESTED]
        if nested and value is not None:
            kwargs[key] = build_section(nested[0], value, dotted)
            continue
        check_value(value, tp, dotted)
        if tp in (float, float | None) and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- checks


def validate_sections(raw: dict, source: str = "") -> Recipe:
    """Build the Recipe from a merged mapping: llmkit's own keys checked by name, type and meaning.

    `options` stays the mapping it was (only its task knows its keys); `task` must be present.
    """
    raw = copy.deepcopy(raw)
    raw.pop("extends", None)
    body = {k: v for k, v in raw.items() if k != "options"}
    recipe = build_section(Recipe, body, "")
    recipe.options = raw.get("options")
    recipe.raw, recipe.recipe_file = raw, source
    _check_semantics(recipe)
    return recipe


def _check_semantics(r: Recipe) -> None:
    d = r.data
    if d.on_bad_rows not in ("error", "skip", "warn"):
        raise RecipeError(f"data.on_bad_rows must be error, skip or warn, got {d.on_bad_rows!r}")
    if not 0 <= d.validation_split < 1:
        raise RecipeError(f"data.validation_split must be in [0, 1), got {d.validation_split}")
    if d.max_length < 8:
        raise RecipeError(f"data.max_length must be at least 8, got {d.max_length}")
    for name in ("max_train_samples", "max_eval_samples", "num_proc"):
        value = getattr(d, name)
        if value is not None and value < 1:
            raise RecipeError(f"data.{name} must be a positive integer, got {value}")
    if d.source is not None and d.source not in BUILTIN_SOURCES:
        raise RecipeError(
            f"data.source: unknown built-in corpus {d.source!r}{suggest(d.source, BUILTIN_SOURCES)}; "
            f"built-in: {', '.join(BUILTIN_SOURCES)}"
        )
    given = [n for n, v in (("load", d.load), ("source", d.source), ("train", d.train)) if v is not None]
    if not given and d.prepared is None:
        raise RecipeError(
            "data: name the data with data.load (load_dataset kwargs), data.train (a file) or data.source"
        )
    if d.prepared is not None and d.streaming:
        raise RecipeError(
            "data.prepared is read memory-mapped, never whole into memory: drop data.streaming=true to use it"
        )
    if d.load is not None and d.source is not None:
        raise RecipeError("data: give either data.load or data.source, not both")
    tt = r.tokenizer.train
    if tt is not None and tt.type not in ("wordpiece", "bpe", "unigram"):
        raise RecipeError(
            f"tokenizer.train.type must be wordpiece, bpe or unigram, got {tt.type!r}{suggest(tt.type, ['wordpiece', 'bpe', 'unigram'])}"
        )
    if tt is not None and tt.vocab_size < 100:
        raise RecipeError(f"tokenizer.train.vocab_size must be at least 100, got {tt.vocab_size}")
    if not isinstance(r.trainer, dict):
        raise RecipeError("trainer must be a mapping of TrainingArguments fields")
    out = r.trainer.get("output_dir")
    if not isinstance(out, str) or not out.strip():  # '' would be the current folder, None a TypeError later
        raise RecipeError(f"trainer.output_dir must name a folder, e.g. runs/my-run; got {show(out)}")
    for role, column in d.columns.items():
        if not isinstance(column, str):
            raise RecipeError(f"{show(f'data.columns.{role}')} must be a column name (a string), got {show(column)}")
    _check_distill(r)
    _check_tune(r.tune)


def _check_tune(t: TuneSection | None) -> None:
    if t is None:
        return
    for key, value, allowed in (
        ("direction", t.direction, (None, "maximize", "minimize")),
        ("sampler", t.sampler, ("tpe", "random")),
        ("pruner", t.pruner, ("median", "none")),
    ):
        if value not in allowed:
            names = [a for a in allowed if a]
            raise RecipeError(f"tune.{key} must be {' or '.join(names)}, got {show(value)}{suggest(str(value), names)}")
    if t.trials < 1:
        raise RecipeError(f"tune.trials must be at least 1, got {t.trials}")


def _check_distill(r: Recipe) -> None:
    """distill: and model.from_teacher: their values, and what they rule out."""
    d, cut = r.distill, r.model.from_teacher
    if d is not None:
        if not d.teacher or not d.teacher.strip():
            raise RecipeError(
                "distill.teacher: name the teacher (a finished run folder), e.g. distill.teacher=runs/teacher"
            )
        if d.temperature <= 0:
            raise RecipeError(f"distill.temperature must be above 0 (2.0 is usual), got {d.temperature}")
        if not 0 <= d.alpha <= 1:
            raise RecipeError(f"distill.alpha must be in [0, 1] (the soft loss's weight), got {d.alpha}")
        if d.hidden_loss < 0:
            raise RecipeError(f"distill.hidden_loss must be 0 (off) or a positive weight, got {d.hidden_loss}")
    if cut is None:
        return
    if d is None:
        raise RecipeError("model.from_teacher cuts the student from its teacher: set distill.teacher=RUN_FOLDER too")
    if not cut.layers or any(i < 0 for i in cut.layers) or len(set(cut.layers)) != len(cut.layers):
        raise RecipeError(
            f"model.from_teacher.layers must list distinct layer numbers from 0, e.g. [0, 2, 4]; got {cut.layers}"
        )
    clash = [f"model.{k}" for k in ("name_or_path", "config", "encoder") if getattr(r.model, k)]
    clash += ["tokenizer.train"] if r.tokenizer.train is not None else []
    if clash:
        raise RecipeError(
            f"model.from_teacher builds the student (and its tokenizer) from the teacher: drop {', '.join(clash)} "
            f"(e.g. {clash[0]}=null)"
        )


BUILTIN_SOURCES = ("pydoc",)


def default_output_dir(raw: dict, path: str | Path) -> dict:
    """trainer.output_dir defaults to runs/<recipe file name>."""
    raw.setdefault("trainer", {})
    if isinstance(raw["trainer"], dict) and "output_dir" not in raw["trainer"]:
        raw["trainer"]["output_dir"] = f"runs/{Path(path).stem}"
    return raw


def check_output_dir(recipe: Recipe) -> None:
    """A run may wipe its output_dir (--overwrite): it must not hold the working folder or the data."""
    try:
        out = Path(recipe.trainer["output_dir"]).expanduser().resolve()
        inside = [("the current folder", Path.cwd())]
        inside += [
            (f"data.{s}", Path(p).resolve()) for s in ("train", "validation", "test") for p in recipe.data.files(s)
        ]
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop
        raise RecipeError(f"trainer.output_dir or a data path is not a usable path: {first_line(e)}") from None
    for what, path in inside:
        if path == out or out in path.parents:
            raise RecipeError(
                f"trainer.output_dir {recipe.trainer['output_dir']} contains {what} ({path}), which --overwrite "
                "would delete; choose a folder of its own, e.g. trainer.output_dir=runs/my-run"
            )
