"""Result rows of the runs a report reads, each labelled with the table row it belongs to.

A table row is a model (the ref an experiment names it by: base, an expert, a merge) at the
values of the sweep axes its result depends on. An axis is a key the runs were started
with different values of; it labels a model's rows when the model's eval results differ
along it (the swept merge at each depth), not when they are shared (the experts under a
sweep of merge depth: one row, whatever the depth). Runs that differ only by their seed
fold into one row, with one result per seed (the tables show mean +- sd). Labels are the
model and the short names of its axes: `swap (bottom=1, top=0)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from polyft.commands.report.scope import overrides, seed_of, value_at
from polyft.runs import read_manifest

_LANG_SUFFIX = re.compile(r"_([a-z]{2,3}(?:_[A-Z][a-z]{3})?)$")


def task_family(task: str, lang: str | None) -> str:
    """'mgsm_direct_sw' -> 'mgsm_direct': one table per family across languages."""
    if lang and task.endswith(f"_{lang}"):
        return task[: -len(lang) - 1]
    m = _LANG_SUFFIX.search(task)
    return task[: m.start()] if m else task


# ------------------------------------------------------------------ what the products say

def _config_langs(data: dict) -> list[str] | None:
    """The languages a data config's rows can have, when the config alone says (fixed
    features.lang, or a source's langs list); None when some source takes them from its rows."""
    langs: set = set()
    for src in (data.get("sources") or {}).values():
        fixed = (src.get("features") or {}).get("lang")
        if fixed:
            langs.add(fixed)
        elif src.get("langs") and src.get("type") in ("synthetic", "xtremeup"):
            langs.update(src["langs"])
        else:
            return None
    keep = data.get("languages")
    return sorted(langs & set(keep) if keep else langs)


def trained_langs(path: str | Path, _depth: int = 0) -> list[str] | None:
    """The languages a model or adapter directory was trained on, from its manifest: a
    training product records them (older ones: read off its data config), a merge is the
    union of its inputs'. None when unknown (a base model, a product from elsewhere)."""
    m = read_manifest(path) if Path(path).is_dir() else None
    if not m or _depth > 8:
        return None
    if "train_langs" in m:  # null: the adapter it continued has none on record
        return None if m["train_langs"] is None else list(m["train_langs"])
    key = m.get("key") or {}
    if m.get("kind") in ("adapter", "model") and isinstance(key.get("data"), dict) \
            and not (key.get("adapter") or {}).get("init_from"):  # a continued one learned its init's too
        return _config_langs(key["data"])
    if m.get("kind") == "merged" and m.get("inputs") and m.get("product") != "adapter":
        parts = [trained_langs(p, _depth + 1) for p in m["inputs"]]
        return None if any(p is None for p in parts) else sorted(set().union(*parts))
    return None


def _scored_model(eval_dir: str) -> str | None:
    return ((read_manifest(eval_dir) or {}).get("model") or {}).get("path")


def layer_swap_depth(model_dir: str | None) -> tuple[int, int] | None:
    """(bottom, top) of a layer-swap merge, from its manifest; None for any other model."""
    m = read_manifest(model_dir) if model_dir and Path(model_dir).is_dir() else None
    merge = ((m or {}).get("key") or {}).get("merge") or {}
    if merge.get("method") != "layer_swap":
        return None
    return int(merge.get("bottom", 0)), int(merge.get("top", 0))


# ------------------------------------------------------------------ records -> rows

def _eval_results(record: dict) -> list[tuple[str, str, dict]]:
    """(model ref, artifact path, result row) of every eval artifact a record made or reused."""
    out = []
    for art in record.get("artifacts", []):
        f = Path(art["path"]) / "results.jsonl"
        if art.get("role") == "eval" and f.exists():
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    out.append((art.get("model") or row["model"], art["path"], row))
    return out


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest suffix no other key ends with (merge.bottom -> bottom)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != k and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[k] = suffix
    return out


def label_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def row_label(model: str, point: dict, names: dict) -> str:
    if not point:
        return model
    return f"{model} ({', '.join(f'{names[k]}={label_value(v)}' for k, v in point.items())})"


def _sortable(v) -> tuple:
    """Numbers in numeric order before anything else, in text order."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _ref_name(ref: str, refs: set) -> str:
    """A path ref by its directory name, unless another ref has the same name."""
    if "/" not in ref:
        return ref
    name = Path(ref.rstrip("/")).name
    return ref if any(o != ref and Path(o.rstrip("/")).name == name for o in refs) else name


def collect(records: list[dict]) -> tuple[list[dict], list[str]]:
    """(result rows labelled by table row, notes). Each row: the lm-eval result (task, lang,
    metric, filter, value, stderr, n) with variant (the table row's label), model (the ref),
    point ({axis: value} of the row), seed (the run's, when the row folds seeds; else None),
    artifact (the eval directory), zero_shot and swap ((bottom, top) of a layer swap)."""
    keys = sorted({k for r in records for k in overrides(r)})
    coords = [{k: value_at(r, k, overrides(r).get(k)) for k in keys} for r in records]
    axes = [k for k in keys if len({json.dumps(c[k], default=str) for c in coords}) > 1]
    results = [_eval_results(r) for r in records]

    # ref -> artifact -> the indices of the records it is in
    holders: dict[str, dict[str, list[int]]] = {}
    for i, got in enumerate(results):
        for ref, path, _ in got:
            holders.setdefault(ref, {}).setdefault(path, [])
            if i not in holders[ref][path]:
                holders[ref][path].append(i)

    def along(ref: str, value) -> tuple[bool, bool]:
        """(constant within each of ref's artifacts, differs between them) for value(i)."""
        per_artifact = [{json.dumps(value(i), default=str) for i in idx} for idx in holders[ref].values()]
        constant = all(len(s) == 1 for s in per_artifact)
        return constant, constant and len(set().union(*per_artifact)) > 1

    names = short_names(axes)
    refs = set(holders)
    label_axes = {ref: [k for k in axes if along(ref, lambda i, k=k: coords[i][k])[1]] for ref in holders}
    folds = {ref: along(ref, lambda i: seed_of(records[i]))[1] for ref in holders}

    out, notes, chosen = [], [], {}
    langs_of: dict[str, list | None] = {}
    swap_of: dict[str, tuple | None] = {}
    # newest record last: of two artifacts for the same row and seed, the newer one is read
    for i, got in enumerate(results):
        for ref, path, _ in got:
            point = {k: coords[i][k] for k in label_axes[ref]}
            seed = seed_of(records[i]) if folds[ref] else None
            slot = json.dumps([ref, point, seed], sort_keys=True, default=str)
            if chosen.get(slot, path) != path:
                label = row_label(_ref_name(ref, refs), point, names)
                notes.append(f"polyft: report: {label}: two different eval results for the same point"
                             + (f" and seed {seed}" if seed is not None else "")
                             + " (its eval data or code changed between the runs); the newer is used")
            chosen[slot] = path
    for i, got in enumerate(results):
        for ref, path, row in got:
            point = {k: coords[i][k] for k in label_axes[ref]}
            seed = seed_of(records[i]) if folds[ref] else None
            if chosen[json.dumps([ref, point, seed], sort_keys=True, default=str)] != path:
                continue
            variant = row_label(_ref_name(ref, refs), point, names)
            if path not in langs_of:
                model_dir = _scored_model(path)
                langs_of[path] = trained_langs(model_dir) if model_dir else None
                swap_of[path] = layer_swap_depth(model_dir)
            trained = langs_of[path]
            zero_shot = None if trained is None or not row.get("lang") else row["lang"] not in trained
            out.append({**row, "model": ref, "variant": variant, "point": point, "seed": seed, "artifact": path,
                        "zero_shot": zero_shot, "swap": swap_of[path]})
    # rows grouped by model (in the order the runs name them), a model's points in order
    order = {ref: n for n, ref in enumerate(dict.fromkeys(ref for got in results for ref, _, _ in got))}
    out.sort(key=lambda r: (order[r["model"]], [_sortable(v) for v in r["point"].values()]))
    # the same artifact reached through several records (a shared expert) is one result
    seen, rows = set(), []
    for r in out:
        key = (r["variant"], r["seed"], r["task"], r["metric"], r.get("filter"), r["artifact"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    return rows, list(dict.fromkeys(notes))
