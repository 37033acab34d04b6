"""Readable names: of a model given by its path alone (model=hf), and the parts of product
directory names. No torch here: the CLI names products before loading anything."""

from __future__ import annotations

import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HF_CACHE = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def slug(text: str) -> str:
    return _UNSAFE.sub("-", str(text)).strip("-.") or "model"


def model_name_of(path: str | None) -> str:
    """A product-name part for model.path: a hub id's repo name (Qwen/Qwen2.5-0.5B ->
    Qwen2.5-0.5B), a directory's last component, a .gguf file's stem; a snapshot in the HF
    cache (.../models--ORG--NAME/snapshots/SHA) is named NAME."""
    if not path:
        return "hf"
    p = Path(str(path).rstrip("/"))
    for part in reversed(p.parts):
        m = _HF_CACHE.match(part)
        if m:
            return slug(m["name"])
    name = p.stem if p.suffix.lower() == ".gguf" else p.name
    return slug(name)
