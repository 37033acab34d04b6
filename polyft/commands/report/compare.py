"""report.compare=ROW: every other row of each table against ROW, on the same items.

Reads lm-eval's per-item scores (`samples/<task>.jsonl` in each eval directory, written
with eval.log_samples=true, the default) and pairs the two models' items by document id,
checking that the documents are the same (lm-eval's doc_hash). A row folding several seeds
scores each item by its mean over the seeds. Per language: the difference in the table's
unit, its 95% paired bootstrap interval and, for 0/1 scores of one run each, the exact
McNemar p-value; for the average over languages, the bootstrap interval (resampled within
each language).
"""

from __future__ import annotations

import csv
import io
import json
from functools import lru_cache
from pathlib import Path

from polyft.commands.report.stats import RESAMPLES, Paired, compare_items
from polyft.commands.report.tables import Table
from polyft.errors import PolyftError

NOTE = ("difference (row − {ref}) [95% paired bootstrap interval over the same items, {n} resamples]; "
        "p: exact McNemar test on the items only one of the two gets right (one run each, 0/1 scores)")


class NoItems(Exception):
    """A cell's per-item scores cannot be read or paired; the message says why."""


@lru_cache(maxsize=256)
def _samples(artifact: str, task: str) -> tuple:
    f = Path(artifact) / "samples" / f"{task}.jsonl"
    if not f.is_file():
        raise NoItems(f"no per-item scores in {artifact} (evaluated with eval.log_samples=false)")
    return tuple(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip())


def item_scores(t: Table, variant: str, lang: str) -> tuple[dict, dict, int]:
    """({doc_id: score averaged over the row's seeds}, {doc_id: doc_hash}, runs) of a cell."""
    runs = t.rows[variant].get(lang)
    if not runs:
        raise NoItems("no result")
    per_run, hashes = [], {}
    for entry in runs.values():
        scores = {}
        for s in _samples(entry.artifact, entry.task):
            if s.get("filter", "none") != t.filter or t.metric not in s:
                continue
            value = s[t.metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise NoItems(f"{t.metric} has no per-item score (a corpus-level metric)")
            scores[s["doc_id"]] = float(value)
            hashes[s["doc_id"]] = s.get("doc_hash")
        if not scores:
            raise NoItems(f"no per-item {t.metric} ({t.filter}) in {entry.artifact}")
        per_run.append(scores)
    if any(set(p) != set(per_run[0]) for p in per_run):
        raise NoItems("the seeds' runs scored different items")
    return {k: sum(p[k] for p in per_run) / len(per_run) for k in per_run[0]}, hashes, len(per_run)


def compare_cell(t: Table, variant: str, reference: str, langs: list[str],
                 resamples: int = RESAMPLES) -> Paired:
    firsts, seconds, single = [], [], True
    for lang in langs:
        x, xh, kx = item_scores(t, variant, lang)
        y, yh, ky = item_scores(t, reference, lang)
        if set(x) != set(y) or any(xh[k] != yh[k] for k in x):
            raise NoItems(f"{lang}: not the same items (another eval limit or data)")
        firsts.append(x)
        seconds.append(y)
        single = single and kx == 1 and ky == 1
    p = compare_items(firsts, seconds, single, resamples)
    s = t.scale
    return Paired(p.diff * s, p.low * s, p.high * s, p.items, p.p, p.b, p.c)


def _num(v: float, scale: float) -> str:
    text = f"{v:+.1f}" if scale == 100 else f"{v:+.2f}"
    return "+" + text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.0"


def show(p: Paired, scale: float) -> str:
    text = f"{_num(p.diff, scale)} [{_num(p.low, scale)}, {_num(p.high, scale)}]"
    return text + (f" p={p.p:.2g}" if p.p is not None else "")


def check_reference(tables: list[Table], reference: str) -> list[Table]:
    """The tables holding row `reference`; refuses a reference that is in none, or whose
    per-item scores were not logged."""
    having = [t for t in tables if reference in t.rows and t.meta]
    if not having:
        rows = list(dict.fromkeys(v for t in tables for v in t.rows))
        raise PolyftError(f"report.compare={reference}: no such row in this report; its rows: {', '.join(rows)}")
    for t in having:
        for lang in t.rows[reference]:
            try:
                item_scores(t, reference, lang)
            except NoItems as exc:
                raise PolyftError(f"report.compare={reference}: {t.title}, {lang}: {exc}; rerun its eval with "
                                  "eval.log_samples=true to compare on the same items") from None
    return having


def comparisons(tables: list[Table], reference: str, resamples: int = RESAMPLES) -> list[dict]:
    """One entry per (table, row, column): the Paired result or why there is none."""
    out = []
    for t in check_reference(tables, reference):
        for variant in t.rows:
            if variant == reference:
                continue
            for col in [*t.langs, "avg"]:
                langs = [col] if col in t.langs else t.group("avg")
                entry = {"table": t, "row": variant, "column": col, "langs": langs}
                try:
                    entry["paired"] = compare_cell(t, variant, reference, langs, resamples)
                except NoItems as exc:
                    entry["why"] = str(exc)
                out.append(entry)
    return out


def to_markdown(found: list[dict], reference: str, resamples: int = RESAMPLES) -> str:
    parts = []
    for t in {id(e["table"]): e["table"] for e in found}.values():
        cols = [*t.langs, "avg"]
        lines = [f"### {t.title}: each row − {reference}, on the same items", "",
                 "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        why = {}
        for variant in dict.fromkeys(e["row"] for e in found if e["table"] is t):
            cells = {e["column"]: e for e in found if e["table"] is t and e["row"] == variant}
            text = []
            for c in cols:
                e = cells.get(c)
                if e and "paired" in e:
                    text.append(show(e["paired"], t.scale))
                else:
                    text.append("—")
                    if e:
                        why.setdefault(e["why"], []).append(f"{variant} {c}")
            lines.append(f"| {variant} | " + " | ".join(text) + " |")
        lines += ["", NOTE.format(ref=reference, n=resamples)]
        lines += [f"—: {reason} ({', '.join(cells)})" for reason, cells in why.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def to_csv(found: list[dict], reference: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "reference", "family", "metric", "filter", "column", "langs", "items", "diff", "ci_low",
                "ci_high", "p_mcnemar", "only_row_right", "only_reference_right", "unit", "why_missing"])
    for e in found:
        t, p = e["table"], e.get("paired")
        nums = ["", "", "", "", "", "", ""] if p is None else [
            p.items, f"{p.diff:.10g}", f"{p.low:.10g}", f"{p.high:.10g}", "" if p.p is None else f"{p.p:.10g}",
            "" if p.b is None else p.b, "" if p.c is None else p.c]
        w.writerow([e["row"], reference, t.family, t.metric, t.filter, e["column"], " ".join(e["langs"]), *nums,
                    t.unit, e.get("why", "")])
    return buf.getvalue()
