"""Report tables: one per task family and metric (and lm-eval filter), rows are the labelled
models, columns the languages plus their average (and the high/low-resource averages).

A cell holds one result per seed the row folds (one result when it folds none) and shows
their mean, `mean ± sd` over seeds, and with report.stderr=true lm-eval's standard error
(of the mean, over seeds). A missing cell stays missing, never zero; an average needs every
language of its group. A score in a language the model's training data has no rows in is
marked zero-shot. Proportions (accuracy, exact match, F1, ROUGE) are shown in percent, as
in the CSV and the plots; other metrics (chrF, perplexity) as lm-eval reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from polyft.commands.report.rows import task_family
from polyft.commands.report.stats import Stat, se_of_mean, summarise

# Resource levels as the multilingual PEFT and merging papers group them (by pretraining data).
HIGH_RESOURCE = {"en", "de", "es", "fr", "ru", "zh", "ja", "it", "pt", "nl", "ar", "vi", "tr", "pl", "ko"}
ZERO_SHOT = "†"  # after a score in a language the model was not trained on
ZERO_SHOT_NOTE = f"{ZERO_SHOT} zero-shot: the model's training data has no rows in this language"
# lm-eval metrics that are not proportions: never shown as percent, whatever their values.
NOT_PROPORTIONS = {"chrf", "bleu", "ter", "sacrebleu", "perplexity", "word_perplexity", "byte_perplexity",
                   "bits_per_byte", "loss"}
HUNDRED_SCALE = {"chrf", "bleu", "ter", "sacrebleu"}  # already 0-100


def scales(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(family, metric) -> 100 when every value of it is a proportion (shown in percent), else 1."""
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (task_family(r["task"], r.get("lang")), r["metric"])
        proportion = r["metric"] not in NOT_PROPORTIONS and 0 <= float(r["value"]) <= 1
        out[key] = 100.0 if out.get(key, 100.0) == 100.0 and proportion else 1.0
    return out


@dataclass(frozen=True)
class Entry:
    """One run's result in a cell, and where it came from (for the per-item comparison)."""

    value: float
    stderr: float | None
    n: int | None
    artifact: str | None
    task: str


@dataclass
class Table:
    title: str
    langs: list[str]
    rows: dict[str, dict[str, dict]] = field(default_factory=dict)  # variant -> lang -> {seed: Entry}
    zero_shot: dict[str, set] = field(default_factory=dict)  # variant -> its languages never trained on
    meta: dict[str, dict] = field(default_factory=dict)  # variant -> {model, point, swap}
    family: str = ""
    metric: str = ""
    filter: str = "none"
    scale: float = 1.0  # 100: values are proportions, shown in percent

    @property
    def unit(self) -> str:
        return "%" if self.scale == 100 else ""

    def bounds(self) -> tuple[float, float] | None:
        """The full range of the metric as shown (colour bars), when it has one."""
        return (0.0, 100.0) if self.scale == 100 or self.metric in HUNDRED_SCALE else None

    def mark(self, variant: str, col: str) -> str:
        held_out = col in self.zero_shot.get(variant, ()) and self.cell(variant, col) is not None
        return ZERO_SHOT if held_out else ""

    def columns(self) -> list[str]:
        cols = list(self.langs) + ["avg"]
        if any(lang in HIGH_RESOURCE for lang in self.langs) and any(lang not in HIGH_RESOURCE for lang in self.langs):
            cols += ["high", "low"]
        return cols

    def group(self, col: str) -> list[str]:
        return {"avg": self.langs, "high": [lg for lg in self.langs if lg in HIGH_RESOURCE],
                "low": [lg for lg in self.langs if lg not in HIGH_RESOURCE]}[col]

    def cell(self, variant: str, col: str) -> Stat | None:
        """The cell as shown, in the table's unit (percent for proportions)."""
        by_lang = self.rows[variant]
        if col in self.langs:
            got = by_lang.get(col)
            if not got:
                return None
            return summarise([e.value * self.scale for e in got.values()],
                             [None if e.stderr is None else e.stderr * self.scale for e in got.values()])
        group = self.group(col)
        if not group or any(lg not in by_lang for lg in group):
            return None
        seeds = set(by_lang[group[0]])
        if any(set(by_lang[lg]) != seeds for lg in group):
            return None
        # the average of each run over the languages, then the mean and sd over runs
        per_run = [sum(by_lang[lg][s].value for lg in group) * self.scale / len(group) for s in seeds]
        ses = [se_of_mean([None if by_lang[lg][s].stderr is None else by_lang[lg][s].stderr * self.scale
                           for lg in group]) for s in seeds]
        return summarise(per_run, ses)

    def folded(self) -> dict[str, list]:
        """variant -> the seeds its cells fold (rows of more than one run only)."""
        out = {}
        for variant, by_lang in self.rows.items():
            seeds = sorted({s for got in by_lang.values() for s in got if s is not None}, key=str)
            if len(seeds) > 1:
                out[variant] = seeds
        return out


def number(v: float | None, scale: float = 100.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.1f}" if scale == 100 else f"{v:.2f}"


def show(stat: Stat | None, scale: float, stderr: bool = False, pm: str = "±") -> str:
    """A cell as text: mean, `mean ± sd` over seeds, and `(SE x)` when asked."""
    if stat is None:
        return "—"
    out = number(stat.mean, scale)
    if stat.sd is not None:
        out += f" {pm} {number(stat.sd, scale)}"
    if stderr and stat.se is not None:
        out += f" (SE {number(stat.se, scale)})"
    return out


def notes(t: Table, stderr: bool) -> list[str]:
    out = []
    folded = t.folded()
    if folded:
        by_seeds: dict[str, list] = {}
        for variant, seeds in folded.items():
            by_seeds.setdefault(", ".join(map(str, seeds)), []).append(variant)
        for seeds, variants in by_seeds.items():
            out.append(f"mean ± sd over seeds {seeds}: {', '.join(variants)}")
    if stderr:
        out.append("SE: lm-eval's standard error of the score (of a mean over seeds: sqrt(Σ SE²)/k; of an "
                   "average over languages: sqrt(Σ SE²)/L)")
    if any(t.zero_shot.values()):
        out.append(ZERO_SHOT_NOTE)
    return out


def to_markdown(t: Table, stderr: bool = False) -> str:
    cols = t.columns()
    out = [f"### {t.title}", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant in t.rows:
        out.append(f"| {variant} | " + " | ".join(show(t.cell(variant, c), t.scale, stderr) + t.mark(variant, c)
                                                  for c in cols) + " |")
    extra = notes(t, stderr)
    return "\n".join(out + ([""] + extra if extra else []))


def to_latex(t: Table, stderr: bool = False) -> str:
    cols = t.columns()
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
             "Model & " + " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for variant in t.rows:
        cells = []
        for c in cols:
            stat = t.cell(variant, c)
            text = "--" if stat is None else show(stat, t.scale, stderr, pm=r"$\pm$")
            cells.append(text + (r"$^\dagger$" if t.mark(variant, c) else ""))
        lines.append(esc(variant) + " & " + " & ".join(cells) + r" \\")
    note = r" ($^\dagger$: zero-shot, a language the model was not trained on)" if any(t.zero_shot.values()) else ""
    if t.folded():
        note += r" ($\pm$: sd over training seeds)"
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(t.title)}{note}}}", r"\end{table}"]
    return "\n".join(lines)


def build_tables(rows: list[dict], metric: str | None = None) -> list[Table]:
    """Rows {variant, task, lang, metric, filter, value, ...} -> one Table per (family,
    metric, filter): each family's first metric and filter, or `metric` (its first filter)."""
    first: dict[str, tuple[str, str]] = {}
    for r in rows:
        if metric is None or r["metric"] == metric:
            first.setdefault(task_family(r["task"], r.get("lang")), (r["metric"], r.get("filter") or "none"))
    scale = scales(rows)
    tables: dict[tuple, Table] = {}
    for r in rows:
        fam = task_family(r["task"], r.get("lang"))
        key = (r["metric"], r.get("filter") or "none")
        if first.get(fam) != key:
            continue
        title = f"{fam}: {key[0]}" + (f" ({key[1]})" if key[1] not in ("none", "") else "")
        t = tables.setdefault((fam, *key), Table(title, [], family=fam, metric=key[0], filter=key[1],
                                                 scale=scale[(fam, key[0])]))
        lang = r.get("lang") or "all"
        if lang not in t.langs:
            t.langs.append(lang)
        t.rows.setdefault(r["variant"], {}).setdefault(lang, {})[r.get("seed")] = Entry(
            float(r["value"]), None if r.get("stderr") is None else float(r["stderr"]), r.get("n"),
            r.get("artifact"), r["task"])
        t.meta.setdefault(r["variant"], {"model": r.get("model", r["variant"]), "point": r.get("point") or {},
                                         "swap": r.get("swap")})
        if r.get("zero_shot"):
            t.zero_shot.setdefault(r["variant"], set()).add(lang)
    for t in tables.values():
        t.langs.sort(key=lambda lg: (lg not in HIGH_RESOURCE, lg))
    return list(tables.values())


class GroupTable(Table):
    """Columns are exactly `langs` (task families, then `all`): no language averages;
    rows hold plain means."""

    def columns(self) -> list[str]:
        return list(self.langs)

    def cell(self, variant: str, col: str) -> Stat | None:
        v = self.rows[variant].get(col)
        return None if v is None else Stat(v * self.scale)

    def folded(self) -> dict[str, list]:
        return {}


def group_table(rows: list[dict], groups: dict, metric: str | None = None) -> GroupTable | None:
    """report.groups {name: [task, ...]} (e.g. seen / held-out pairs): one row per variant and
    group, one column per task family (its first metric, as in the per-family tables) with the
    mean over the group's tasks (and seeds), and `all`, the mean over all of them."""
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
    scale = scales([r for _, r in kept])
    t = GroupTable("by group: " + ", ".join(f"{f} {first.get(f, (metric,))[0]}" for f in fams), fams + ["all"],
                   scale=100.0 if all(scale.get(k) == 100.0 for k in scale) else 1.0)
    for variant in dict.fromkeys(r["variant"] for _, r in kept):
        for group, tasks in groups.items():
            got = [(fam, float(r["value"])) for fam, r in kept if r["variant"] == variant and r["task"] in tasks]
            if got:
                cells = {f: sum(v for g, v in got if g == f) / n for f in fams
                         if (n := sum(1 for g, _ in got if g == f))}
                t.rows[f"{variant} / {group}"] = {**cells, "all": sum(v for _, v in got) / len(got)}
    return t
