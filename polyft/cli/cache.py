"""Composed configs kept between commands as YAML, keyed by everything composition reads.

Hydra's composition (0.25-0.4 s on 2 cores: some 30 YAML files parsed and merged into the
typed schema, and Hydra's own import) is most of a command's start-up, and it gives the same
config every time the same command line runs against the same files. The key covers the
command and its overrides, the working directory (Hydra records it), every YAML file on the
search path (path, size, modification time), the files that define the schemas (polyft's and
those of every Hydra plugin), and the versions of Python, hydra-core and omegaconf.

An entry is the composed config (hydra node included, interpolations such as ${now:...}
unresolved) as plain YAML; nothing is unpickled. Reading it back merges the job part into
OmegaConf.structured(RootConfig), so its nodes carry the types a composition gives them; the
hydra node comes back untyped (typing it would import Hydra, which a cached run avoids; what
reads it, the runner, --cfg and the launcher check, reads values only). A read-back config whose values differ from the entry's
(a schema that converts a value) is never used: the entry is marked and Hydra composes.

Only configs that polyft's own runner can run (polyft.cli.compose.runnable) are kept.
POLYFT_COMPOSE_CACHE=0 turns the cache off; the directory is $XDG_CACHE_HOME/polyft/compose
(default ~/.cache/polyft/compose).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from polyft.config.schema import CONF_DIR, RootConfig
from polyft.runs import package_versions

_POLYFT = Path(__file__).resolve().parents[1]
# The code that makes a composed config: polyft.config (the schema dataclasses and what they
# may come to import), TinySpec (the tiny model's entry), and how polyft composes and stores.
SCHEMA_DIR = _POLYFT / "config"
SCHEMA_FILES = (_POLYFT / "models" / "tiny.py", _POLYFT / "cli" / "compose.py", Path(__file__).resolve())
FORMAT = "1"  # entries written by another layout of this module are other keys
KEEP = 400  # entries; beyond this the oldest half goes
UNUSABLE = b""  # an entry that does not read back as composed: compose it every time
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def directory() -> Path | None:
    if os.environ.get("POLYFT_COMPOSE_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polyft" / "compose"


def _files(root: Path, suffixes: tuple[str, ...]) -> list[str]:
    lines, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # Hydra follows links too
        seen.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                             and os.path.realpath(os.path.join(dirpath, d)) not in seen)
        for name in sorted(filenames):
            if name.endswith(suffixes):
                st = os.stat(os.path.join(dirpath, name))
                lines.append(f"{dirpath}/{name}\t{st.st_size}\t{st.st_mtime_ns}")
    return lines


def key(command: str, overrides: list[str], dirs: list[Path]) -> str | None:
    """The entry's name for this composition, or None when it is not to be cached: the cache
    is off, or a pkg:// search path entry names files this key cannot see."""
    if directory() is None:
        return None
    if any(o.lstrip("+~").partition("=")[0] == "hydra.searchpath" for o in overrides):
        return None  # compose.with_dirs leaves only pkg:// entries there
    versions = package_versions()
    parts = [FORMAT, sys.version, versions.get("hydra-core", "?"), versions.get("omegaconf", "?"),
             command, os.getcwd(), *(f"override\t{o}" for o in overrides)]
    for d in [CONF_DIR, *dirs]:
        parts += [f"dir\t{d}", *_files(Path(d), (".yaml", ".yml"))]
    parts += _files(SCHEMA_DIR, (".py",))
    for f in SCHEMA_FILES:
        st = f.stat()
        parts.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
    plugins = importlib.util.find_spec("hydra_plugins")  # every Hydra plugin's configs (launchers)
    for p in (plugins.submodule_search_locations or []) if plugins else []:
        if os.path.isdir(p):
            parts += [f"plugins\t{p}", *_files(Path(p), (".py", ".yaml", ".yml"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _as_data(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def _same(a, b) -> bool:
    """Equal values, types and key order (1 and True, or 1 and 1.0, are not the same)."""
    try:
        return json.dumps(a, allow_nan=True) == json.dumps(b, allow_nan=True)
    except (TypeError, ValueError):
        return False


def rebuild(data: dict):
    """The config an entry holds: the job part typed by the schema, the hydra node first."""
    data = dict(data)
    hydra = data.pop("hydra")
    cfg = OmegaConf.unsafe_merge(OmegaConf.create({"hydra": hydra}), OmegaConf.structured(RootConfig), data)
    OmegaConf.set_struct(cfg, True)  # as Hydra leaves a composed config
    cfg.hydra._set_flag("readonly", False)
    return cfg


def load(k: str | None):
    """The cached config of key `k`, or None (no entry, unreadable, or marked unusable)."""
    d = directory()
    if k is None or d is None:
        return None
    path = d / f"{k}.yaml"
    try:
        text = path.read_bytes()
        if text == UNUSABLE:
            return None
        data = yaml.load(text, Loader=_Loader)
        cfg = rebuild(data)
    except Exception:  # no entry, a damaged one, or one the schema refuses: a miss, never an error
        return None
    if not _same(_as_data(cfg), data):
        _write(path, UNUSABLE)
        return None
    try:
        os.utime(path)  # recently used: pruned last
    except OSError:
        pass
    return cfg


def store(k: str | None, cfg) -> None:
    d = directory()
    if k is None or d is None:
        return
    try:
        text = yaml.dump(_as_data(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        d.mkdir(parents=True, exist_ok=True)
        _write(d / f"{k}.yaml", text.encode("utf-8"))
        entries = list(d.glob("*.yaml"))
        if len(entries) > KEEP:
            for f in sorted(entries, key=lambda f: f.stat().st_mtime)[: len(entries) - KEEP // 2]:
                f.unlink(missing_ok=True)
    except (OSError, yaml.YAMLError):
        pass  # a read-only home, say: compose every time


def _write(path: Path, blob: bytes) -> None:
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except OSError:
        pass
