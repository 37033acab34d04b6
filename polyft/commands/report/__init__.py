"""`polyft report`: paper-style tables, plots and a tidy CSV from the runs on disk.

    polyft report                          the latest run (its whole sweep, if it was a sweep point)
    polyft report +exp=NAME                every run of the experiment (the newest per sweep point)
    polyft report report.dir=DIR           every run under DIR
    polyft report report.stderr=true       lm-eval's standard error in each cell
    polyft report report.compare=base      every row against `base` on the same items

Reads only run.json records, the eval directories they point at (results.jsonl, samples/)
and the manifests of the evaluated products. Writes into report.out (default
<output_root>/reports/<exp_name or latest>): table.md (also printed), table.tex, results.csv
(long format, polyft/commands/report/tidy.py), compare.md/.csv with report.compare, and the
figures with their numbers (polyft/commands/report/plots.py); then prints where.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from polyft import console
from polyft.commands.report import compare as paired
from polyft.commands.report.plots import write_plots
from polyft.commands.report.rows import collect, task_family, trained_langs
from polyft.commands.report.scope import Scope, records_for, select
from polyft.commands.report.tables import (
    HIGH_RESOURCE,
    ZERO_SHOT,
    ZERO_SHOT_NOTE,
    GroupTable,
    Table,
    build_tables,
    group_table,
    to_latex,
    to_markdown,
)
from polyft.commands.report.tidy import to_csv
from polyft.errors import PolyftError
from polyft.runs import write_text

# what other modules and the tests use from here
__all__ = ["HIGH_RESOURCE", "ZERO_SHOT", "ZERO_SHOT_NOTE", "GroupTable", "Scope", "Table", "build_tables", "collect",
           "group_table", "groups_of", "records_for", "report_runs", "select", "task_family", "to_csv", "to_latex",
           "to_markdown", "trained_langs", "where", "write_report"]
INDEX = "report.json"  # the files a report wrote: the next report into the same directory removes them


def groups_of(cfg) -> dict:
    return OmegaConf.to_container(cfg.report.groups, resolve=True) if cfg.report.get("groups") else {}


def _tables(rows: list[dict], metric: str | None, groups: dict | None) -> list[Table]:
    tables = build_tables(rows, metric)
    grouped = group_table(rows, groups or {}, metric)
    if grouped is not None and grouped.rows:
        tables.append(grouped)
    return tables


def _clear(out_dir: Path) -> None:
    """Remove what the last report wrote here: no figure of an older report stays beside the new one."""
    index = out_dir / INDEX
    if index.is_file():
        for name in json.loads(index.read_text()).get("files", []):
            f = out_dir / Path(name).name
            if f.is_file():
                f.unlink()


def write_report(rows: list[dict], out_dir: Path, metric: str | None = None, groups: dict | None = None,
                 stderr: bool = False, compare: str | None = None) -> dict:
    """Tables, CSV, figures (and the comparison with report.compare) into out_dir."""
    out_dir = Path(out_dir)
    tables = _tables(rows, metric, groups)
    found = paired.comparisons(tables, compare) if compare else []
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    md = "\n\n".join(to_markdown(t, stderr) for t in tables)
    files = {"table.md": md + "\n", "table.tex": "\n\n".join(to_latex(t, stderr) for t in tables) + "\n",
             "results.csv": to_csv(rows)}
    if found:
        md += "\n\n" + paired.to_markdown(found, compare)
        files["compare.md"] = paired.to_markdown(found, compare) + "\n"
        files["compare.csv"] = paired.to_csv(found, compare)
    for name, text in files.items():  # each whole or not at all (written aside, renamed)
        write_text(out_dir / name, text)
    plots = write_plots(tables, out_dir)
    written = [out_dir / n for n in files] + [q for p in plots for q in (p, p.with_suffix(".json"))]
    (out_dir / INDEX).write_text(json.dumps({"files": [p.name for p in written]}, indent=1) + "\n")
    return {"markdown": md, "tables": len(tables), "plots": [str(p) for p in plots], "dir": str(out_dir),
            "files": [str(p) for p in written]}


def _shown(path: str | Path) -> str:
    """A path as the user can type it: relative to the working directory when below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def where(summary: dict) -> str:
    """One line: the directory and the files the report wrote."""
    names = [Path(f).name for f in summary["files"] if not f.endswith(".json")]
    return f"polyft: report written to {_shown(summary['dir'])}: {', '.join(names)}"


def report_runs(scope: Scope, out_dir: Path, cfg, lenient: bool = False) -> dict | None:
    """The report over the scope's records into out_dir (None when they hold no results);
    the scope's notes and the report's own are printed. lenient (the reports `polyft run`
    writes after its work): a report.compare this report cannot make is a note, not an error
    (a sweep point has no row `swap (bottom=1)`; the sweep's report has)."""
    rows, notes = collect(scope.records)
    for line in scope.notes + notes:
        console.echo(line)
    if not rows:
        return None
    args = (rows, out_dir, cfg.report.metric, groups_of(cfg), bool(cfg.report.get("stderr")))
    try:
        return write_report(*args, cfg.report.get("compare"))
    except PolyftError as exc:
        if not lenient or not cfg.report.get("compare"):
            raise
        console.echo(f"polyft: report: no comparison here: {exc}")
        return write_report(*args)


def _rows_or_fail(cfg) -> tuple[Scope, list[dict]]:
    scope = records_for(cfg)
    rows, _ = collect(scope.records)
    if not rows:
        where_ = cfg.report.dir or (f"{cfg.output_root} (exp_name={cfg.exp_name})" if cfg.exp_name
                                    else cfg.output_root)
        raise PolyftError(f"no evaluation results found under {where_}; run `polyft eval` or `polyft run` first")
    return scope, rows


def preflight(cfg) -> None:
    """Before the run directory: the runs exist and report.compare names a row with per-item scores."""
    _, rows = _rows_or_fail(cfg)
    if cfg.report.get("compare"):
        paired.check_reference(_tables(rows, cfg.report.metric, groups_of(cfg)), cfg.report.compare)


def command(cfg, record) -> None:
    scope, _ = _rows_or_fail(cfg)
    out = Path(cfg.report.out or Path(cfg.output_root) / "reports" / (cfg.exp_name or "latest"))
    summary = report_runs(scope, out, cfg)
    console.echo(summary["markdown"])
    console.echo(where(summary))
    record.metrics["report"] = {k: v for k, v in summary.items() if k != "markdown"}
    record.metrics["report"]["runs"] = [r["run_dir"] for r in scope.records]
    record.add_artifact("report", out, reused=False)

