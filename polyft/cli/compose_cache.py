"""Composed configs kept between commands, keyed by everything composition reads.

Hydra's composition (about 0.25 s on 2 cores: some 30 YAML files parsed and merged into the
typed schema) is the largest part of a command's start-up, and it is the same every time the
same command line runs against the same config files. The key covers: the command, its
overrides, the working directory (Hydra records it in the config), the user's config
directories, every YAML file on the search path (path, size, modification time), the modules
that define schemas (polyft/config.py, the launcher configs of polyft's Hydra plugins), and
the versions of Python, hydra-core and omegaconf. Interpolations such as ${now:...} are kept
unresolved. POLYFT_COMPOSE_CACHE=0 turns the cache off; the directory is
$XDG_CACHE_HOME/polyft/compose (default ~/.cache/polyft/compose).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SCHEMA_FILES = (ROOT.parent / "config" / "schema.py", ROOT / "launchers.py")
KEEP = 400  # entries; the oldest are removed beyond this


def directory() -> Path | None:
    if os.environ.get("POLYFT_COMPOSE_CACHE", "1") in ("0", "false", "no", "off"):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "polyft" / "compose"


def _stat_lines(paths) -> list[str]:
    lines = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file() and f.suffix in (".yaml", ".yml", ".py"):
                st = f.stat()
                lines.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
    return lines


def key(command: str, overrides: list[str], conf_dirs: list[Path]) -> str:
    import hydra
    import hydra_plugins  # the namespace of every Hydra plugin installed (launchers and their configs)
    import omegaconf

    sources = [*conf_dirs, *SCHEMA_FILES, *hydra_plugins.__path__]
    parts = [sys.version, hydra.__version__, omegaconf.__version__, command, os.getcwd(),
             *[f"override\t{o}" for o in overrides], *_stat_lines(sources)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def load(k: str):
    d = directory()
    if d is None:
        return None
    try:
        with open(d / f"{k}.pkl", "rb") as fh:
            return pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None


def store(k: str, cfg) -> None:
    d = directory()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{k}.{os.getpid()}.tmp"
        tmp.write_bytes(pickle.dumps(cfg))
        os.replace(tmp, d / f"{k}.pkl")
        entries = list(d.glob("*.pkl"))
        if len(entries) > KEEP:
            for f in sorted(entries, key=lambda f: f.stat().st_mtime)[: len(entries) - KEEP // 2]:
                f.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home: compose every time
