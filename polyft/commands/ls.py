"""`polyft ls [WORD ...]`: the products on disk, one table per kind, with the settings that
tell them apart, their size and date.

Reads manifests only: the store (<output_root>/artifacts/<kind>/<name>-<hash>/) and the
products runs wrote to an output_dir (named in the run records under <output_root>). A WORD
keeps the products whose kind, name or model contain it (`polyft ls lora r8`: both).
Nothing is written, nothing heavy is imported.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from polyft.runs import read_manifest

KINDS = ("adapter", "model", "merged", "eval")  # the order of the tables; others follow


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _adapter(a: dict) -> str:
    if a.get("type") == "full":
        return "full"
    if a.get("type") == "flix":
        return "flix " + " ".join(f"{t}{r}" for t, r in (a.get("ranks") or {}).items())
    out = f"{'dora' if a.get('dora') else 'lora'} r={a.get('r')} a={a.get('alpha', 0):g}"
    return out + (" (continued)" if a.get("init_from") else "")


def _loss(m: dict) -> str:
    loss = m.get("eval_loss", m.get("final_loss"))
    return "-" if loss is None else f"{loss:.3f}" + (" (val)" if m.get("eval_loss") is not None else "")


def settings(m: dict) -> dict:
    """The columns of one product (by its kind) from its manifest."""
    key, kind = m.get("key") or {}, m.get("kind")
    if kind in ("adapter", "model"):
        model = key.get("model") or {}
        return {"model": model.get("name", "?"), "adapter": _adapter(key.get("adapter") or {}),
                "quant": (key.get("quant") or {}).get("name") or "none",
                "data": (key.get("data") or {}).get("name", "?"), "steps": str(m.get("steps", "-")),
                "loss": _loss(m)}
    if kind == "merged":
        inputs = m.get("inputs") or ([m["source"]] if m.get("source") else [])
        return {"method": m.get("method", "?"),
                "inputs": ", ".join(Path(p).name for p in inputs) or "-"}
    if kind == "eval":
        model = m.get("model") or {}
        return {"model": model.get("ref") or Path(str(model.get("path", "?"))).name,
                "suite": m.get("suite", "?"), "tasks": str(len(m.get("tasks") or []))}
    return {}


def products(root: Path) -> list[tuple[Path, dict]]:
    """(directory, manifest) of every complete product: the store's, then output_dirs the run
    records name (their manifests say they are polyft products)."""
    found, seen = [], set()
    store = root / "artifacts"
    if store.is_dir():
        for kind_dir in sorted(d for d in store.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for d in sorted(kind_dir.iterdir()):
                m = read_manifest(d) if d.is_dir() and not d.name.startswith(".") else None
                if m:
                    found.append((d, m))
                    seen.add(d.resolve())
    for sub in ("runs", "multirun"):
        for f in sorted((root / sub).rglob("run.json")) if (root / sub).is_dir() else []:
            try:
                artifacts = json.loads(f.read_text()).get("artifacts") or []
            except (OSError, json.JSONDecodeError):
                continue
            for a in artifacts:
                d = Path(str(a.get("path", "")))
                if d.is_dir() and d.resolve() not in seen:
                    m = read_manifest(d)
                    if m:
                        found.append((d, m))
                        seen.add(d.resolve())
    return found


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def table(rows: list[dict]) -> list[str]:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    return ["  ".join(c.upper().ljust(width[c]) for c in cols).rstrip()] + \
           ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in rows]


def show(cfg, words: list[str]) -> int:
    root = Path(cfg.output_root)
    found = products(root)
    by_kind: dict[str, list[dict]] = {}
    total = 0
    for d, m in found:
        kind = m.get("kind", "?")
        row = {"name": d.name, **settings(m)}
        text = " ".join([kind, d.name, *row.values()]).lower()
        if any(w.lower() not in text for w in words):
            continue
        size = size_of(d)
        total += size
        row.update(size=human(size), created=str(m.get("created", "-")).replace("T", " ")[:16])
        if not d.resolve().is_relative_to((root / "artifacts").resolve()):
            row["name"] = _shown(d)  # an output_dir: its path
        by_kind.setdefault(kind, []).append(row)
    if not by_kind:
        what = f" matching {' '.join(words)}" if words else ""
        print(f"polyft: no products{what} under {_shown(root)}", file=sys.stderr)
        return 0
    count = sum(len(v) for v in by_kind.values())
    for kind in sorted(by_kind, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k)):
        print(f"{kind} ({len(by_kind[kind])})")
        print("\n".join("  " + line for line in table(by_kind[kind])))
        print()
    print(f"{count} product(s), {human(total)}, in {_shown(root / 'artifacts')}")
    return 0
