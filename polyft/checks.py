"""Value rules shared by the config rules and the merge methods' own parameter rules: each
refuses a value with one ConfigError line naming the key and what is allowed."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import ListConfig

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

