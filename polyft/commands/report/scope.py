"""Which run records a report reads.

`polyft report` reads the latest run (a whole sweep when the latest run was a sweep point),
`polyft report +exp=NAME` every run of that experiment, `report.dir=DIR` every run below DIR.
Of several runs of the same point (same swept values, seed and evaluated models) the newest
counts. A report never puts scores on different eval limits side by side: the runs whose
limit for a task differs from the newest run's are left out, and the report says so.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from polyft.errors import PolyftError
from polyft.runs import load_runs

# Overrides that never make a sweep axis: the command, the experiment, Hydra's own, and
# where or how a run logs (they change no result).
_NOT_AXES = ("command", "exp", "seed", "config_dirs", "output_root", "output_dir", "verbose", "logger",
             "resources", "offline")
_NOT_AXIS_KEYS = ("eval.log_samples", "eval.batch_size", "eval.device")  # the scores do not change


@dataclass
class Scope:
    records: list[dict]
    notes: list[str] = field(default_factory=list)  # one line each: what was left out and why


def overrides(record: dict) -> dict[str, str]:
    """The key=value overrides the run was started with (Hydra's saved list), less those
    that are no axis."""
    return dict(_overrides(str(Path(record["run_dir"]) / ".hydra" / "overrides.yaml")))


@functools.lru_cache(maxsize=4096)
def _overrides(path: str) -> tuple:
    f = Path(path)
    if not f.exists():
        return ()
    out = {}
    for o in yaml.safe_load(f.read_text()) or []:
        k, _, v = str(o).lstrip("+~").partition("=")
        if not k.startswith("hydra") and k.split(".")[0] not in _NOT_AXES and k not in _NOT_AXIS_KEYS:
            out[k] = v
    return tuple(out.items())


def value_at(record: dict, key: str, given: str | None = None):
    """The value a run had for a swept key: read from its resolved config (so a run that did
    not set the key counts with its default), a config group by its option name."""
    node = record.get("config") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return given
        node = node[part]
    if isinstance(node, dict):
        return node.get("name", node.get("type", given))
    return node


def seed_of(record: dict):
    return record.get("seed", (record.get("config") or {}).get("seed"))


def task_limits(record: dict) -> dict[str, int | None]:
    """{task: limit} the run evaluated with (its eval record; older runs: eval.limit)."""
    tasks = (record.get("eval") or {}).get("tasks")
    if tasks:
        return {t["name"]: t.get("limit") for t in tasks}
    limit = ((record.get("config") or {}).get("eval") or {}).get("limit")
    return {r["task"]: limit for r in (record.get("metrics") or {}).get("results", [])}


def _started(record: dict) -> tuple:
    return record.get("started", ""), record["run_dir"]


def newest_per_point(records: list[dict]) -> list[dict]:
    keys = sorted({k for r in records for k in overrides(r)})
    latest: dict[str, dict] = {}
    for r in sorted(records, key=_started):
        ev = (r.get("config") or {}).get("eval") or {}
        point = {k: value_at(r, k, overrides(r).get(k)) for k in keys}
        latest[json.dumps([point, seed_of(r), ev.get("models"), ev.get("model")], sort_keys=True, default=str)] = r
    return sorted(latest.values(), key=_started)


def _limits_text(limits: set) -> str:
    return ", ".join("none" if v is None else str(v) for v in sorted(limits, key=lambda v: (v is None, v or 0)))


def one_limit(records: list[dict]) -> Scope:
    """The records whose task limits agree with the newest record's (and each other's)."""
    agreed: dict[str, int | None] = {}
    kept, left = [], []
    for r in sorted(records, key=_started, reverse=True):
        limits = task_limits(r)
        if any(t in agreed and agreed[t] != v for t, v in limits.items()):
            left.append(r)
            continue
        agreed.update(limits)
        kept.append(r)
    notes = []
    if left:
        theirs = {v for r in left for v in task_limits(r).values()}
        dirs = sorted({str(Path(r["run_dir"]).parent) for r in left})
        notes.append(f"polyft: report: left out {len(left)} run(s) evaluated with eval.limit={_limits_text(theirs)} "
                     f"(this report: eval.limit={_limits_text(set(agreed.values()))}); scores on different limits "
                     f"are not put side by side; `polyft report report.dir=DIR` reports them (in {', '.join(dirs)})")
    return Scope(sorted(kept, key=_started), notes)


def select(records: list[dict]) -> Scope:
    """The newest run per point, on one eval limit (records of finished run/eval commands)."""
    return one_limit(newest_per_point([r for r in records if r.get("status") == "ok"
                                       and r.get("command") in ("run", "eval")]))


def _sweep_of(record: dict) -> Path | None:
    """The sweep directory a run belongs to (Hydra writes multirun.yaml there), if any."""
    parent = Path(record["run_dir"]).parent
    return parent if (parent / "multirun.yaml").exists() else None


def records_for(cfg) -> Scope:
    """What `polyft report` reads: report.dir, else the experiment's runs under output_root
    (+exp=NAME), else the latest run (its whole sweep if it was a sweep point)."""
    if cfg.report.dir:
        root = Path(cfg.report.dir)
        if not root.is_dir():
            raise PolyftError(f"report.dir={cfg.report.dir}: no such directory; give a run or sweep directory "
                              f"(e.g. under {cfg.output_root}/runs or {cfg.output_root}/multirun)")
        return select(load_runs(root))
    root = Path(cfg.output_root)
    runs = [r for r in load_runs(root) if r.get("status") == "ok" and r.get("command") in ("run", "eval")] \
        if root.is_dir() else []
    if cfg.exp_name:
        return select([r for r in runs if (r.get("config") or {}).get("exp_name") == cfg.exp_name])
    if not runs:
        return Scope([])
    latest = max(runs, key=_started)
    sweep = _sweep_of(latest)
    if sweep is None:
        return select([latest])
    return select([r for r in runs if Path(r["run_dir"]).parent == sweep])
