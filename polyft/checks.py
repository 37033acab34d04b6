"""Value rules shared by the config rules and the merge methods' own parameter rules: each
refuses a value with one ConfigError line naming the key and what is allowed.

The rule objects (Number, OneOf, Text, Flag, Items, Custom) are what polyft.config.values
holds per key; `library_names` reads a library's own list of names from its source."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig

from polyft.errors import ConfigError


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value} is not allowed; use one of: {', '.join(map(str, allowed))}")


def numbers(key: str, value: Any, ok: Callable[[float], bool] = lambda x: True, allowed: str = "a number") -> None:
    """A number, or a non-empty list of numbers (a gradient over layer depth)."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v) for v in values):
        raise ConfigError(f"{key}={value} is not allowed; use {allowed}, or a list of them "
                          "(anchors spread over layer depth)")


def is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, ListConfig))


def is_mapping(value: Any) -> bool:
    return isinstance(value, (dict, DictConfig))


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


# ---------------------------------------------------------------- rules, one per key

@dataclass(frozen=True)
class Number:
    """A number in [low, high] (an end is open when *_open); `integer`: whole numbers only;
    `null`: None allowed; `gradient`: a non-empty list of them too (anchors over layer depth)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    null: bool = False
    gradient: bool = False

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            where = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            where = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            where = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            where = ""
        return (kind + where + (", or a list of them (anchors spread over layer depth)" if self.gradient else "")
                + (", or null" if self.null else ""))

    def fits(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.integer and not isinstance(v, int)):
            return False
        if v != v:  # nan is in no range
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def check(self, key: str, value: Any) -> None:
        if value is None and self.null:
            return
        values = list(value) if self.gradient and is_list(value) else [value]
        if not values or not all(self.fits(v) for v in values):
            raise ConfigError(f"{key}={_shown(value)} is not allowed; use {self.allowed()}")


@dataclass(frozen=True)
class OneOf:
    """One of a list of names; `values` may be a function (a library's list, read when needed)."""

    values: tuple | Callable[[], tuple]
    null: bool = False
    source: str = ""  # where the list comes from, when it is a library's

    def options(self) -> tuple:
        return tuple(self.values() if callable(self.values) else self.values)

    def check(self, key: str, value: Any) -> None:
        if value is None and self.null:
            return
        options = self.options()
        hashable = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        if not hashable or value not in options:
            where = f" ({self.source})" if self.source else ""
            raise ConfigError(f"{key}={_shown(value)} is not allowed; use one of{where}: "
                              + ", ".join(map(str, options)) + (", or null" if self.null else ""))


@dataclass(frozen=True)
class Text:
    """Any text: a name, a path, an id. `why` says why any value is allowed."""

    why: str
    null: bool = True

    def check(self, key: str, value: Any) -> None:
        if value is None and self.null:
            return
        if not isinstance(value, str):
            raise ConfigError(f"{key}={_shown(value)} is not allowed; give text ({self.why})"
                              + (" or null" if self.null else ""))


@dataclass(frozen=True)
class Flag:
    null: bool = False

    def check(self, key: str, value: Any) -> None:
        if not (isinstance(value, bool) or (value is None and self.null)):
            raise ConfigError(f"{key}={_shown(value)} is not allowed; use true or false"
                              + (" (or null)" if self.null else ""))


@dataclass(frozen=True)
class Items:
    """A list whose every item follows `rule`; `empty`: whether [] is allowed."""

    rule: Any
    null: bool = False
    empty: bool = True

    def check(self, key: str, value: Any) -> None:
        if value is None and self.null:
            return
        if not is_list(value):
            raise ConfigError(f"{key}={_shown(value)} is not allowed; give a list ([a, b, ...])"
                              + (" or null" if self.null else ""))
        if not value and not self.empty:
            raise ConfigError(f"{key} is empty; give at least one entry")
        for i, item in enumerate(value):
            self.rule.check(f"{key}[{i}]", item)


@dataclass(frozen=True)
class Custom:
    """A value of more than one kind (8 or auto:N): checked by `fn(key, value)`. `refused`
    are examples of values it refuses, for the reference documentation and its test."""

    fn: Callable[[str, Any], None]
    about: str
    refused: tuple = ()

    def check(self, key: str, value: Any) -> None:
        self.fn(key, value)


# ---------------------------------------------------------------- libraries' own lists

@functools.lru_cache(maxsize=None)
def library_names(module: str, name: str) -> tuple[str, ...]:
    """The names a library lists at `module`.`name`: the values of an enum class, the items
    of a list or tuple, the keys of a dict (`Class.attribute` for a class attribute), or the
    choices of a Literal annotation (`Class.field`). Read from the module's source, since
    importing transformers' trainer modules takes seconds and a config check is instant;
    imported only when the source does not say. What a source file says is kept on disk
    (keyed by the file's path, size and modification time): parsing it is 10-70 ms."""
    found = _cached_source(module, name)
    if found:
        return found
    obj = importlib.import_module(module)
    owner = obj
    for part in name.split("."):
        owner, obj = obj, getattr(obj, part, None)
    if obj is None:  # an annotated field without a default
        obj = typing.get_type_hints(owner).get(name.split(".")[-1])
    if isinstance(obj, type):
        return tuple(str(m.value) for m in obj)
    if isinstance(obj, dict):
        return tuple(map(str, obj))
    if isinstance(obj, (list, tuple)):
        return tuple(map(str, obj))
    return tuple(map(str, typing.get_args(obj)))


def _cached_source(module: str, name: str) -> tuple[str, ...]:
    f = _module_file(module)
    if f is None:
        return ()
    st = f.stat()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    digest = hashlib.sha256(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\t{name}".encode()).hexdigest()[:32]
    entry = Path(base) / "polyft" / "names" / f"{digest}.json"
    try:
        return tuple(json.loads(entry.read_text()))
    except (OSError, ValueError):
        pass
    found = _from_source(f, name)
    if found:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(found))
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only home: parse every time
    return found


def _module_file(module: str) -> Path | None:
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # the top package only: its submodules are not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _strings(node) -> tuple[str, ...]:
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = node.elts
    elif isinstance(node, ast.Dict):
        items = node.keys
    elif isinstance(node, ast.Subscript):  # Literal["a", "b"]
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    else:
        return ()
    if not all(isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items):
        return ()
    return tuple(i.value for i in items)


def _from_source(f: Path, name: str) -> tuple[str, ...]:
    body = ast.parse(f.read_text(encoding="utf-8")).body
    *classes, attr = name.split(".")
    for cls in classes:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if body is None:
            return ()
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name == attr:  # an enum: NAME = "value"
            return tuple(n.value.value for n in node.body if isinstance(n, ast.Assign)
                         and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            return _strings(node.value)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attr:
            return _strings(node.annotation) or (_strings(node.value) if node.value is not None else ())
    return ()
