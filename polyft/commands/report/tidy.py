"""results.csv: every result the report read, one line per (row, seed, task, metric, filter).

Long format (one value per line) for pandas, R or a spreadsheet pivot:
    row        the table row's label, e.g. `swap (bottom=1, top=0)`
    model      the model as the experiment names it (base, an expert, a merge) or its path
    point      the sweep values of the row, `key=value` separated by spaces (empty: none)
    seed       the run's seed when the row folds runs over seeds, else empty
    task, family, lang, metric, filter    as lm-eval reports them (family: task less language)
    value      the score: percent for proportions (unit `%`), else as lm-eval reports it
    stderr     lm-eval's standard error of the score, in the same unit
    n          the number of items scored
    unit       `%` or empty
    zero_shot  true when the model's training data has no rows in this language, empty when unknown
    artifact   the eval directory the score was read from (lm-eval's results.json, samples/)
"""

from __future__ import annotations

import csv
import io

from polyft.commands.report.rows import label_value, task_family
from polyft.commands.report.tables import scales

COLUMNS = ("row", "model", "point", "seed", "task", "family", "lang", "metric", "filter", "value", "stderr", "n",
           "unit", "zero_shot", "artifact")


def _g(x: float) -> str:
    return f"{x:.10g}"


def to_csv(rows: list[dict]) -> str:
    scale = scales(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        fam = task_family(r["task"], r.get("lang"))
        s = scale[(fam, r["metric"])]
        w.writerow([r["variant"], r.get("model", r["variant"]),
                    " ".join(f"{k}={label_value(v)}" for k, v in (r.get("point") or {}).items()),
                    "" if r.get("seed") is None else r["seed"], r["task"], fam, r.get("lang") or "", r["metric"],
                    r.get("filter") or "none", _g(float(r["value"]) * s),
                    "" if r.get("stderr") is None else _g(float(r["stderr"]) * s), r.get("n") or "",
                    "%" if s == 100 else "", "" if r.get("zero_shot") is None else str(bool(r["zero_shot"])).lower(),
                    r.get("artifact") or ""])
    return buf.getvalue()
