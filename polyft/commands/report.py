"""`polyft report`: paper-style tables and plots from the records on disk.

Reads only run.json records, the eval artifacts' results.jsonl they point at, and the
manifests of the evaluated products (for the languages each was trained on). Rows of a
table are model variants (or sweep points), columns are languages plus the average and
the high/low-resource averages; a missing cell stays missing, never zero. A score in a
language the model's training data has no rows in is marked zero-shot (ZERO_SHOT after the
value; the CSV lists those languages per row). Writes Markdown (also printed), CSV and
LaTeX, and PNG plots: metric vs LoRA rank per language, metric per quantisation, and a
bottom x top swap-depth heatmap.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from polyft import console
from polyft.errors import PolyftError
from polyft.runs import load_runs, read_manifest, write_text

# Resource levels as the multilingual PEFT and merging papers group them (by pretraining data).
HIGH_RESOURCE = {"en", "de", "es", "fr", "ru", "zh", "ja", "it", "pt", "nl", "ar", "vi", "tr", "pl", "ko"}
_LANG_SUFFIX = re.compile(r"_([a-z]{2,3}(?:_[A-Z][a-z]{3})?)$")
ZERO_SHOT = "†"  # after a score in a language the model was not trained on
ZERO_SHOT_NOTE = f"{ZERO_SHOT} zero-shot: the model's training data has no rows in this language"


def task_family(task: str, lang: str | None) -> str:
    """'mgsm_direct_sw' -> 'mgsm_direct': one table per family across languages."""
    if lang and task.endswith(f"_{lang}"):
        return task[: -len(lang) - 1]
    m = _LANG_SUFFIX.search(task)
    return task[: m.start()] if m else task


@dataclass
class Table:
    title: str
    langs: list[str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> lang -> value
    zero_shot: dict[str, set] = field(default_factory=dict)  # variant -> its languages never trained on

    def mark(self, variant: str, col: str) -> str:
        held_out = col in self.zero_shot.get(variant, ()) and self.cell(variant, col) is not None
        return ZERO_SHOT if held_out else ""

    def columns(self) -> list[str]:
        cols = list(self.langs) + ["avg"]
        if any(lang in HIGH_RESOURCE for lang in self.langs) and any(lang not in HIGH_RESOURCE for lang in self.langs):
            cols += ["high", "low"]
        return cols

    def cell(self, variant: str, col: str) -> float | None:
        values = self.rows[variant]
        if col in self.langs:
            return values.get(col)
        group = {"avg": self.langs, "high": [lg for lg in self.langs if lg in HIGH_RESOURCE],
                 "low": [lg for lg in self.langs if lg not in HIGH_RESOURCE]}[col]
        got = [values[lg] for lg in group if lg in values]
        return sum(got) / len(got) if got and len(got) == len(group) else None


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}" if abs(v) <= 1 else f"{v:.2f}"


def to_markdown(t: Table) -> str:
    cols = t.columns()
    out = [f"### {t.title}", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant in t.rows:
        out.append(f"| {variant} | " + " | ".join(_fmt(t.cell(variant, c)) + t.mark(variant, c) for c in cols) + " |")
    if any(t.zero_shot.values()):
        out += ["", ZERO_SHOT_NOTE]
    return "\n".join(out)


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = t.columns()
    marked = any(t.zero_shot.values())  # cells stay numbers: the marks get a column of their own
    w.writerow(["table", "model", *cols, *(["zero_shot"] if marked else [])])
    for variant in t.rows:
        w.writerow([t.title, variant, *["" if (v := t.cell(variant, c)) is None else f"{v:.6g}" for c in cols],
                    *([" ".join(lg for lg in t.langs if lg in t.zero_shot.get(variant, ()))] if marked else [])])
    return buf.getvalue()


def to_latex(t: Table) -> str:
    cols = t.columns()
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
             "Model & " + " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for variant in t.rows:
        lines.append(esc(variant) + " & " + " & ".join(
            ("--" if (v := t.cell(variant, c)) is None else _fmt(v)) + (r"$^\dagger$" if t.mark(variant, c) else "")
            for c in cols) + r" \\")
    note = r" ($^\dagger$: zero-shot, a language the model was not trained on)" if any(t.zero_shot.values()) else ""
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(t.title)}{note}}}", r"\end{table}"]
    return "\n".join(lines)


def build_tables(rows: list[dict], metric: str | None = None) -> list[Table]:
    """Rows {variant, task, lang, metric, filter, value} -> one Table per (family, metric, filter)."""
    first_metric: dict[str, tuple[str, str]] = {}
    for r in rows:
        fam = task_family(r["task"], r.get("lang"))
        if metric is None:
            first_metric.setdefault(fam, (r["metric"], r.get("filter") or "none"))
    tables: dict[tuple, Table] = {}
    for r in rows:
        fam = task_family(r["task"], r.get("lang"))
        key = (r["metric"], r.get("filter") or "none")
        if (metric is None and key != first_metric[fam]) or (metric is not None and r["metric"] != metric):
            continue
        title = f"{fam}: {key[0]}" + (f" ({key[1]})" if key[1] not in ("none", "") else "")
        t = tables.setdefault((fam, *key), Table(title, []))
        lang = r.get("lang") or "all"
        if lang not in t.langs:
            t.langs.append(lang)
        t.rows.setdefault(r["variant"], {})[lang] = float(r["value"])
        if r.get("zero_shot"):
            t.zero_shot.setdefault(r["variant"], set()).add(lang)
    for t in tables.values():
        t.langs.sort(key=lambda lg: (lg not in HIGH_RESOURCE, lg))
    return list(tables.values())


class GroupTable(Table):
    """Columns are exactly `langs` (task families, then `all`): no language averages."""

    def columns(self) -> list[str]:
        return list(self.langs)

    def cell(self, variant: str, col: str) -> float | None:
        return self.rows[variant].get(col)


def group_table(rows: list[dict], groups: dict, metric: str | None = None) -> GroupTable | None:
    """report.groups {name: [task, ...]} (e.g. seen / held-out pairs): one row per variant and
    group, one column per task family (its first metric, as in the per-family tables) with the
    mean over the group's tasks, and `all`, the mean over all of them."""
    if not groups:
        return None
    first: dict[str, tuple] = {}
    kept = []
    for r in rows:
        fam = task_family(r["task"], r.get("lang"))
        key = (r["metric"], r.get("filter") or "none")
        if (first.setdefault(fam, key) == key) if metric is None else r["metric"] == metric:
            kept.append((fam, r))
    fams = list(dict.fromkeys(fam for fam, _ in kept))
    t = GroupTable("by group: " + ", ".join(f"{f} {first.get(f, (metric,))[0]}" for f in fams), fams + ["all"])
    for variant in dict.fromkeys(r["variant"] for _, r in kept):
        for group, tasks in groups.items():
            got = [(fam, float(r["value"])) for fam, r in kept if r["variant"] == variant and r["task"] in tasks]
            if got:
                cells = {f: sum(v for g, v in got if g == f) / n for f in fams
                         if (n := sum(1 for g, _ in got if g == f))}
                t.rows[f"{variant} / {group}"] = {**cells, "all": sum(v for _, v in got) / len(got)}
    return t


# ------------------------------------------------------------------ plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(cells: dict[tuple[int, int], float], title: str, path: Path) -> Path:
    """Swap depth: bottom layers (rows) x top layers (columns); missing cells left blank."""
    import numpy as np

    plt = _plt()
    bottoms = sorted({b for b, _ in cells})
    tops = sorted({u for _, u in cells})
    grid = np.full((len(bottoms), len(tops)), np.nan)
    for (b, u), v in cells.items():
        grid[bottoms.index(b), tops.index(u)] = v
    fig, ax = plt.subplots(figsize=(1.2 * len(tops) + 2.5, 1.0 * len(bottoms) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tops)), [str(u) for u in tops])
    ax.set_yticks(range(len(bottoms)), [str(b) for b in bottoms])
    ax.set_xlabel("top layers swapped")
    ax.set_ylabel("bottom layers swapped")
    for i in range(len(bottoms)):
        for j in range(len(tops)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, _fmt(grid[i, j]), ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lines(series: dict[str, dict], xlabel: str, title: str, path: Path, categorical: bool = False) -> Path:
    """One line per language: metric against a swept value (rank, or quantisation)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs_all = sorted({x for s in series.values() for x in s}, key=lambda x: (isinstance(x, str), x))
    for lang, points in sorted(series.items()):
        xs = [x for x in xs_all if x in points]
        pos = [xs_all.index(x) for x in xs] if categorical else xs
        ax.plot(pos, [points[x] for x in xs], marker="o", label=lang)
    if categorical:
        ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ records on disk

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


def _eval_model_langs(eval_dir: str) -> list[str] | None:
    """The training languages of the model an eval artifact scored (its manifest names it)."""
    m = read_manifest(eval_dir) or {}
    path = (m.get("model") or {}).get("path")
    return trained_langs(path) if path else None


def _eval_rows(record: dict) -> list[tuple[str, dict]]:
    """(artifact path, result row) of every eval artifact a record made or reused."""
    rows = []
    for art in record.get("artifacts", []):
        f = Path(art["path"]) / "results.jsonl"
        if art.get("role") == "eval" and f.exists():
            rows.extend((art["path"], json.loads(line)) for line in f.read_text().splitlines() if line.strip())
    return rows


def sweep_label(record: dict) -> dict:
    """The values a sweep set for this run (Hydra's saved overrides, less its own)."""
    f = Path(record["run_dir"]) / ".hydra" / "overrides.yaml"
    if not f.exists():
        return {}

    out = {}
    for o in yaml.safe_load(f.read_text()) or []:
        k, _, v = str(o).lstrip("+~").partition("=")
        if k not in ("command", "exp") and not k.startswith("hydra"):
            out[k] = v
    return out


def collect(records: list[dict]) -> list[dict]:
    """Result rows labelled by variant. A variant whose results differ between sweep points
    (another eval artifact at each point, e.g. the swept merge) is labelled with its point."""
    per_record = [(rec, sweep_label(rec), _eval_rows(rec)) for rec in records]
    paths: dict[str, set] = {}
    for _, _, rows in per_record:
        for path, row in rows:
            paths.setdefault(row["model"], set()).add(path)
    out, seen = [], set()
    langs_of: dict[str, list | None] = {}
    for rec, label, rows in per_record:
        point = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(label.items()))
        for path, row in rows:
            variant = row["model"]
            if point and len(paths[variant]) > 1:
                variant = f"{variant} ({point})"
            key = (variant, row["task"], row.get("lang"), row["metric"], row.get("filter"))
            if key not in seen:
                seen.add(key)
                if path not in langs_of:
                    langs_of[path] = _eval_model_langs(path)
                trained = langs_of[path]
                zero_shot = None if trained is None or not row.get("lang") else row["lang"] not in trained
                out.append({**row, "variant": variant, "point": label, "zero_shot": zero_shot})
    return out


def records_for(cfg) -> list[dict]:
    root = Path(cfg.report.dir) if cfg.report.dir else Path(cfg.output_root)
    if not root.exists():
        raise PolyftError(f"report.dir={root}: no such directory")
    recs = [r for r in load_runs(root) if r.get("status") == "ok" and r.get("command") in ("run", "eval")]
    if cfg.exp_name and not cfg.report.dir:
        recs = [r for r in recs if (r.get("config") or {}).get("exp_name") == cfg.exp_name]
    # the newest record per sweep point wins
    latest: dict[str, dict] = {}
    for r in sorted(recs, key=lambda r: r.get("started", "")):
        latest[json.dumps(sweep_label(r), sort_keys=True) + str((r.get("config") or {}).get("eval", {}).get("models"))
               + str((r.get("config") or {}).get("eval", {}).get("model"))] = r
    return list(latest.values())


def write_report(rows: list[dict], out_dir: Path, metric: str | None = None,
                 merged_name: str = "swap", groups: dict | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(rows, metric)
    grouped = group_table(rows, groups or {}, metric)
    if grouped is not None and grouped.rows:
        tables.append(grouped)
    md = "\n\n".join(to_markdown(t) for t in tables)
    # each file whole or not at all (written aside, renamed): a killed run leaves no half table
    write_text(out_dir / "table.md", md + "\n")
    write_text(out_dir / "table.csv", "".join(to_csv(t) for t in tables))
    write_text(out_dir / "table.tex", "\n\n".join(to_latex(t) for t in tables) + "\n")
    plots = []
    for t in tables:
        fam = t.title.split(":")[0]
        swap_cells = {}
        for r in rows:
            p = r["point"]
            if "merge.bottom" in p and "merge.top" in p and r["model"] == merged_name \
                    and t.title.startswith(task_family(r["task"], r.get("lang")) + ":"):
                swap_cells.setdefault((int(p["merge.bottom"]), int(p["merge.top"])), []).append(float(r["value"]))
        if len(swap_cells) > 1:
            cells = {k: sum(v) / len(v) for k, v in swap_cells.items()}
            plots.append(plot_heatmap(cells, f"{t.title}, mean over languages", out_dir / f"heatmap_{fam}.png"))
        for axis, name, categorical in (("adapter.r", "LoRA rank", False), ("quant", "quantisation", True)):
            series: dict[str, dict] = defaultdict(dict)
            for r in rows:
                if axis in r["point"] and t.title.startswith(task_family(r["task"], r.get("lang")) + ":"):
                    x = r["point"][axis]
                    series[r.get("lang") or "all"][x if categorical else int(x)] = float(r["value"])
            if series and len({x for s in series.values() for x in s}) > 1:
                slug = axis.replace(".", "_")
                plots.append(plot_lines(series, name, t.title, out_dir / f"{slug}_{fam}.png", categorical))
    return {"markdown": md, "tables": len(tables), "plots": [str(p) for p in plots], "dir": str(out_dir)}


def groups_of(cfg) -> dict:
    return OmegaConf.to_container(cfg.report.groups, resolve=True) if cfg.report.get("groups") else {}


def command(cfg, record) -> None:
    records = records_for(cfg)
    rows = collect(records)
    if not rows:
        where = cfg.report.dir or f"{cfg.output_root} (exp_name={cfg.exp_name})"
        raise PolyftError(f"no evaluation results found under {where}; run `polyft eval` or `polyft run` first")
    out = Path(cfg.report.out or Path(cfg.output_root) / "reports" / (cfg.exp_name or "latest"))
    merged = cfg.merge.name or "swap"
    summary = write_report(rows, out, cfg.report.metric, merged, groups_of(cfg))
    console.echo(summary["markdown"])
    record.metrics["report"] = {k: v for k, v in summary.items() if k != "markdown"}
    record.add_artifact("report", out, reused=False)
