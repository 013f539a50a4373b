"""Recipe loading: YAML, `extends:`, key=value overrides, validation and friendly errors."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import RecipeError, first_line, show, suggest

# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2 scalars: `1e-4` is a float (PyYAML 1.1 reads a string, which breaks trainers
    later) and only true/false are booleans (`save_strategy: no` must stay the string "no")."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")  # YAML 1.2: `no` stays the string "no"
_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _ch in "tTfF":
    _Loader.yaml_implicit_resolvers.setdefault(_ch, []).append(("tag:yaml.org,2002:bool", _BOOL))
for _ch in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_ch] = [
        r for r in _Loader.yaml_implicit_resolvers.get(_ch, []) if r[0] != "tag:yaml.org,2002:float"
    ] + [("tag:yaml.org,2002:float", _FLOAT)]


# More values and levels than any recipe has: a YAML "alias bomb" (anchors of anchors) expands past them.
_MAX_VALUES, _MAX_DEPTH = 100_000, 64


def parse_yaml(text: str, where: str = "<string>") -> Any:
    """Parse YAML text safely, with scientific-notation floats, raising RecipeError with line:column."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(f"{where}{pos}: YAML syntax error: {first_line(e.problem or e.context or e)}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: YAML error: {first_line(e)}") from None
    except RecursionError:
        raise RecipeError(f"{where}: YAML nested too deeply; a recipe is a few levels of key: value") from None
    except (ValueError, TypeError, OverflowError) as e:  # a tagged or implicit scalar that fails to build
        raise RecipeError(f"{where}: YAML value error: {first_line(e)}; quote the value to keep it a string") from None
    _count_values(data, where)
    return data


def _count_values(data: Any, where: str) -> int:
    """The number of values `data` expands to, refusing self-referencing and exploding aliases.

    Memoized by object identity, so shared (aliased) nodes are counted once per reference in linear time.
    """
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def size(node: Any, depth: int = 0) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if depth > _MAX_DEPTH:
            raise RecursionError
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise RecipeError(f"{where}: a YAML alias refers to itself (&anchor inside its own value); remove it")
        open_ids.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1 + sum(size(child, depth + 1) for child in children)
        if total > _MAX_VALUES:
            raise RecipeError(
                f"{where}: YAML expands to over {_MAX_VALUES:,} values (aliases of aliases?); simplify it"
            )
        open_ids.discard(key)
        sizes[key] = total
        return total

    try:
        return size(data)
    except RecursionError:
        raise RecipeError(f"{where}: YAML nested too deeply; a recipe is a few levels of key: value") from None


def dump_yaml(data: Any) -> str:
    """Dump a plain dict as block-style YAML, keys in their given order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------- files and extends


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise RecipeError(f"recipe file not found: {path}{hint}; check the path or run `llmkit recipes`")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM some editors write is not YAML
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "a recipe is a UTF-8 YAML file: re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {first_line(e)}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """Merge `over` into a copy of `base`: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and everything it `extends:` (relative to the file), merged: extended < this file."""
    path = Path(path)
    try:
        resolved = path.resolve()
        path.is_file()  # a name too long for the file system fails here, not halfway through
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        where = f" (extends: in {_stack[-1]})" if _stack else ""
        why = getattr(e, "strerror", None) or first_line(e)  # not str(e): an OSError repeats the (long) name
        raise RecipeError(f"bad recipe path {show(str(path), 200)}{where}: {why}; check the file name") from None
    if resolved in _stack:
        cycle = (*_stack[_stack.index(resolved) :], resolved)
        chain = " -> ".join(p.name for p in cycle)
        fix = (
            f"a recipe cannot extend itself: remove `extends: {path.name}` from {path.name}"
            if len(cycle) == 2
            else "remove one of these extends: (a recipe cannot be its own ancestor)"
        )
        raise RecipeError(f"{path}: extends cycle: {chain}; {fix}")
    data = _read_mapping(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{path}: extends must be a file name or a list of file names")
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, load_raw(path.parent / parent, (*_stack, resolved)))
    return deep_merge(merged, data)


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_][A-Za-z0-9_\-]*)*$")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a copy of `raw`."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not _KEY.match(key):
            raise RecipeError(
                f"bad override {item!r}: overrides are key=value with a dotted key, "
                "e.g. trainer.learning_rate=3e-4 or data.max_length=256"
            )
        parsed = parse_yaml(value, f"override {key}") if value.strip() else None
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"bad override {item!r}: {where} is {child!r}, not a section")
            node = child
        node[parts[-1]] = parsed
    return out


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
    quantization: dict | None = None  # transformers.BitsAndBytesConfig kwargs (QLoRA): needs CUDA + bitsandbytes


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


@dataclass
class Recipe:
    """A validated recipe. `raw` keeps the merged dict (what `recipe show` prints and runs save)."""

    task: str
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    options: Any = None  # the task's own Options dataclass
    trainer: dict = field(default_factory=dict)  # -> transformers.TrainingArguments
    peft: dict | None = None  # -> peft.LoraConfig
    generation: dict | None = None  # -> transformers.GenerationConfig
    metrics: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)
    recipe_file: str = ""
    # Built by resolve(): the Hugging Face objects the sections above describe.
    args: Any = field(default=None, repr=False)  # TrainingArguments / Seq2SeqTrainingArguments
    lora: Any = field(default=None, repr=False)  # peft.LoraConfig
    generation_config: Any = field(default=None, repr=False)  # transformers.GenerationConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer["output_dir"])


_INTERNAL = ("raw", "recipe_file", "args", "lora", "generation_config")
_NESTED = {ModelSection, TokenizerSection, TokenizerTrainSection, DataSection}


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


def _check_value(value: Any, tp: Any, dotted: str) -> None:
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
        _check_value(value, tp, dotted)
        if tp in (float, float | None) and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- validation


def validate(raw: dict, source: str = "") -> Recipe:
    """Check the recipe's shape and llmkit's own keys (fast: no heavy imports)."""
    from llmkit.tasks import all_tasks, get_task

    raw = copy.deepcopy(raw)
    raw.pop("extends", None)
    if "task" not in raw:
        raise RecipeError(f"{source or 'recipe'}: missing 'task:' (one of: {', '.join(all_tasks())})")
    task = get_task(raw["task"])
    options_raw = raw.get("options")
    body = {k: v for k, v in raw.items() if k != "options"}
    recipe = build_section(Recipe, body, "")
    recipe.options = build_section(task.Options, options_raw, "options")
    recipe.raw, recipe.recipe_file = raw, source
    _check_semantics(recipe)
    task.validate(recipe)
    if recipe.metrics:
        from llmkit.metrics import extra_metrics

        extra_metrics(recipe.metrics)  # fails now, not after training, when one cannot be loaded
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
    if not given:
        raise RecipeError(
            "data: name the data with data.load (load_dataset kwargs), data.train (a file) or data.source"
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
            raise RecipeError(f"data.columns.{role} must be a column name (a string), got {show(column)}")


BUILTIN_SOURCES = ("pydoc",)


def shipped_recipes_dir() -> Path:
    """The recipes/ folder: inside the installed package (wheel), else beside it (a checkout)."""
    here = Path(__file__).resolve().parent
    return here / "recipes" if (here / "recipes").is_dir() else here.parent / "recipes"


def shipped_recipe(task: str) -> Path:
    """The shipped recipe for a task (`llmkit finetune --task ner` -> recipes/ner.yaml)."""
    from llmkit.tasks import all_tasks

    path = shipped_recipes_dir() / {"mlm": "bert.yaml", "clm": "gpt2.yaml"}.get(task, f"{task}.yaml")
    if not path.is_file():
        raise RecipeError(
            f"no shipped recipe for task {task!r}{suggest(task, all_tasks())}; tasks: {', '.join(all_tasks())}"
        )
    return path


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge (`extends:`), override and validate a recipe file. Heavy sections are built by `resolve`."""
    raw = apply_overrides(load_raw(path), overrides or [])
    raw.setdefault("trainer", {})
    if isinstance(raw["trainer"], dict) and "output_dir" not in raw["trainer"]:
        raw["trainer"]["output_dir"] = f"runs/{Path(path).stem}"
    recipe = validate(raw, str(path))
    _check_output_dir(recipe)
    return recipe


def _check_output_dir(recipe: Recipe) -> None:
    """A run may wipe its output_dir (--overwrite): it must not hold the working folder or the data."""
    try:
        out = Path(recipe.trainer["output_dir"]).expanduser().resolve()
        inside = [("the current folder", Path.cwd())]
        inside += [(f"data.{s}", Path(p).resolve()) for s in ("train", "validation", "test") for p in _files(recipe, s)]
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop
        raise RecipeError(f"trainer.output_dir or a data path is not a usable path: {first_line(e)}") from None
    for what, path in inside:
        if path == out or out in path.parents:
            raise RecipeError(
                f"trainer.output_dir {recipe.trainer['output_dir']} contains {what} ({path}), which --overwrite "
                "would delete; choose a folder of its own, e.g. trainer.output_dir=runs/my-run"
            )


def _files(recipe: Recipe, split: str) -> list[str]:
    value = getattr(recipe.data, split)
    return [] if value is None else [value] if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------- Hugging Face sections

# llmkit's defaults under the recipe's trainer section (the recipe wins).
TRAINER_DEFAULTS = {"report_to": ["tensorboard"]}


def _has_accelerator() -> bool:
    import torch
    from transformers.utils import is_torch_xla_available

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available() or xpu or is_torch_xla_available()


def fast_bf16_available() -> bool:
    """True where bfloat16 autocast runs fast: CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].splitlines()[0].split()
    except (OSError, IndexError):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_hf_kwargs(cls: type, kwargs: dict, path: str) -> None:
    """Reject unknown keys and plainly wrong scalar types for a Hugging Face dataclass, by recipe path."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - forward refs we cannot evaluate: skip type checks
        hints = {}
    basic = (str, int, float, bool, type(None))

    def checkable(m: Any) -> bool:  # types check_type knows; enums, tuples and classes are left to the constructor
        origin = typing.get_origin(m)
        if origin is list:
            return all(a in basic for a in typing.get_args(m))
        return m in basic or m in (dict, list) or origin is dict

    for key, value in kwargs.items():
        if key not in fields:
            shown = show(f"{path}.{key}")
            raise RecipeError(f"unknown key {shown}{suggest(str(key), fields)} (not a {cls.__name__} field)")
        tp = hints.get(key)
        members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if tp is not None and all(checkable(m) for m in members):
            _check_value(value, tp, f"{path}.{key}")


def _hf_error(path: str, e: Exception) -> RecipeError:
    """One line for a Hugging Face constructor that rejected the recipe's section at `path`."""
    if isinstance(e, OSError) and e.filename is not None:  # e.g. trainer.deepspeed / accelerator_config: a file
        return RecipeError(
            f"{path}: cannot read {e.filename!r} ({e.strerror or first_line(e)}); "
            "a string there names a config file: fix the path, or write the settings as a mapping"
        )
    if isinstance(e, (ValueError, TypeError, ImportError)):
        return RecipeError(f"{path}: {first_line(e)}")
    return RecipeError(f"{path}: a value has the wrong shape ({type(e).__name__}: {first_line(e)}); check {path}")


def _construct(cls: type, kwargs: dict, path: str) -> Any:
    check_hf_kwargs(cls, kwargs, path)
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - the constructor validates user values and fails in many types
        raise _hf_error(path, e) from None


def _check_quantization(settings: dict) -> None:
    """4-bit/8-bit loading (QLoRA) runs only on CUDA with bitsandbytes: say so before any work."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            "model.quantization (4-bit/8-bit, QLoRA) needs a CUDA GPU; this machine has none. "
            "Remove model.quantization to train LoRA in full precision"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("model.quantization (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    _construct(BitsAndBytesConfig, settings, "model.quantization")


def resolve(recipe: Recipe) -> Recipe:
    """Build the Hugging Face objects of the recipe (TrainingArguments, LoraConfig, GenerationConfig).

    This is where a bad `trainer:`/`peft:`/`generation:` key fails, in the first seconds of a run.
    """
    from llmkit.tasks import get_task

    task = get_task(recipe.task)
    trainer = {**TRAINER_DEFAULTS, **task.trainer_defaults, **recipe.trainer}
    if "bf16" not in trainer and "fp16" not in trainer:
        trainer["bf16"] = fast_bf16_available()
    # Settings that depend on where and how this process runs, not on the experiment: they go to
    # TrainingArguments but not into the recipe, so a run can resume from a pipe, a terminal or torchrun.
    runtime = {}
    if "use_cpu" not in trainer and not _has_accelerator():
        # On a CPU-only machine say so: under torchrun Accelerate sets up gloo DDP only when told it is
        # on CPU (otherwise every process trains alone), and bf16 autocast on CPU needs it too.
        runtime["use_cpu"] = True
    if "disable_tqdm" not in trainer:
        import sys

        # A live progress bar on a terminal; one plain line per log step in pipes and CI logs.
        runtime["disable_tqdm"] = os.environ.get("LLMKIT_VERBOSITY") == "quiet" or not sys.stderr.isatty()
    if "dataloader_pin_memory" not in trainer:
        import torch

        # Pinned memory only helps host-to-GPU copies; on CPU it just warns.
        runtime["dataloader_pin_memory"] = torch.cuda.is_available()
    recipe.trainer = trainer
    recipe.args = _construct(task.training_args_cls(), {**trainer, **runtime}, "trainer")
    if recipe.model.quantization is not None:
        _check_quantization(recipe.model.quantization)
    if recipe.model.trust_remote_code:
        import logging

        m = recipe.model
        logging.getLogger("llmkit").warning(
            "model.trust_remote_code is on: Python code from %s will run on this machine; "
            "keep it on only for a repository you trust (pin model.revision to the commit you reviewed)",
            " and ".join(repr(x) for x in (m.name_or_path, m.encoder, m.decoder) if x) or "the model",
        )
    if recipe.peft is not None:
        import peft

        lora = dict(recipe.peft)
        lora.setdefault("task_type", task.peft_task_type)
        recipe.lora = _construct(peft.LoraConfig, lora, "peft")
    if recipe.generation is not None:
        from transformers import GenerationConfig

        gen = GenerationConfig()
        unknown = [k for k in recipe.generation if not isinstance(k, str) or not hasattr(gen, k)]
        if unknown:
            raise RecipeError(f"unknown key {show(f'generation.{unknown[0]}')}{suggest(str(unknown[0]), vars(gen))}")
        try:
            recipe.generation_config = GenerationConfig(**recipe.generation)
            recipe.generation_config.validate(strict=True)
        except Exception as e:  # noqa: BLE001 - as in _construct
            raise _hf_error("generation", e) from None
    if recipe.metrics:
        from llmkit.metrics import extra_metrics

        extra_metrics(recipe.metrics)  # fails now, not after training, when one cannot be loaded
    return recipe
