"""Recipe files: the YAML dialect (YAML 1.2 scalars, safe), `extends:` chains and key=value overrides; dicts in, dicts out."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import RecipeError, first_line, show

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


def deep_merge(base: dict, over: dict, top: bool = True) -> dict:
    """Merge `over` into a copy of `base`: mappings merge key by key, anything else is replaced. The entries of
    `search:` are replaced whole: a space of another kind ({choice: ...} over {float: ...}) is not a mix of both."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if top and key == "data" and isinstance(value, dict) and isinstance(out.get(key), dict):
            for named in ("load", "source"):
                if value.get(named) is not None:
                    _drop_other_source(out[key], named)
        if top and key == "search" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _drop_other_source(data: dict, named: str) -> None:
    """data.load and data.source name the corpus each: the one an extending recipe or an override names replaces
    the other (`llmkit pretrain recipes/gpt2.yaml data.load.path=...` on a recipe with `source: pydoc`)."""
    data.pop("source" if named == "load" else "load", None)


def shipped_recipes_dir() -> Path:
    """The recipes/ folder: inside the installed package (wheel), else beside it (a checkout)."""
    here = Path(__file__).resolve().parent
    return here / "recipes" if (here / "recipes").is_dir() else here.parent / "recipes"


def shipped_recipe_file(name: str) -> Path | None:
    """The shipped recipe a name means, from any folder: `recipes/bert.yaml`, `bert.yaml` or `bert`; else None."""
    parts = [p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or Path(name).is_absolute() or ".." in parts:
        return None
    if parts[0] == "recipes" and len(parts) > 1:
        parts = parts[1:]
    if not parts[-1].endswith((".yaml", ".yml")):
        parts[-1] += ".yaml"
    path = shipped_recipes_dir().joinpath(*parts)
    return path if path.is_file() else None


def find_recipe(name: str | Path, folder: Path | None = None) -> Path:
    """The file a recipe name means: an existing file (relative to `folder`, else the current folder) wins;
    else llmkit's shipped recipe of that path or name (one log line says which file is read)."""
    path = Path(folder, name) if folder is not None else Path(name)
    if path.is_file():
        return path
    shipped = shipped_recipe_file(str(name))
    if shipped is None:
        return path  # reported as not found by the reader
    logging.getLogger("llmkit").info("Reading llmkit's shipped recipe %s", shipped)
    return shipped


def load_raw(path: str | Path, _stack: tuple[Path, ...] = (), _folder: Path | None = None) -> dict:
    """Read a recipe file and everything it `extends:` (relative to the file, else shipped), merged:
    extended < this file. A name that is no file is looked up among the shipped recipes (find_recipe)."""
    try:
        path = find_recipe(path, _folder)
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
        merged = deep_merge(merged, load_raw(parent, (*_stack, resolved), path.parent))
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
        if parts[0] == "data" and len(parts) > 1 and parts[1] in ("load", "source") and parsed is not None:
            _drop_other_source(out["data"], parts[1])
    return out
