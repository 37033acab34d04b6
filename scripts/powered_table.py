"""A powered real-model table: mean +- sd over seeds per cell, the precondition rows and the
decision rule, all read from a spec written before the run (scripts/powered/<name>.yaml;
docs/results-real.md has the designs).

Reads only `polyft run` records on disk (status ok, the latest per seed and sweep point) and
the result rows they carry; trains, merges and scores nothing.

    python scripts/powered_table.py swap_powered_de [--root outputs]

A spec names the experiment, its seeds, its rows (a model of the experiment, optionally at a
sweep point: config values the record must have), its cells (task, metric, filter), the
precondition (row beats ref on a task by more than two standard errors of the difference)
and the rule (comparisons row - ref on a task; ref may be a list: the best of them per seed).

A comparison over n seeds *appears* when its mean difference exceeds 2 SE, SE being the larger
of the item noise pooled over seeds and the seed spread sd/sqrt(n), and when it exceeds its own
2 se in at least min(2, n) seeds; *reversed* is the same with the signs flipped. The rule's
verdict: "appears" when at least `need` comparisons appear (default: all) and none is reversed;
"reversed" the other way round; otherwise "not shown"; "not testable" when fewer than
min(2, n) seeds pass the precondition.

Exit status 0 whatever the outcome; 2 when a record is missing or the spec is bad.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

SPECS = Path(__file__).resolve().parent / "powered"
VERDICTS = {"appears": "**The effect appears.**", "reversed": "**The effect is reversed.**",
            "not shown": "**The effect is not shown.**"}


def read_spec(name: str) -> dict:
    import yaml

    path = SPECS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPECS.glob("*.yaml")))
        print(f"{name}: no spec {path}; known: {known}", file=sys.stderr)
        raise SystemExit(2)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec["rows"] = [r if isinstance(r, dict) else {"label": r, "model": r} for r in spec["rows"]]
    for r in spec["rows"]:
        r.setdefault("model", r["label"])
        r.setdefault("point", {})
    return spec


def load(root: Path, spec: dict) -> dict:
    """seed -> {(row label, task): (value, stderr, n)} from the latest ok run record per seed
    and sweep point."""
    from polyft.commands.report.scope import value_at
    from polyft.runs import load_runs

    records = [r for r in load_runs(root) if r.get("command") == "run" and r.get("status") == "ok"
               and value_at(r, "exp_name") == spec["exp"] and value_at(r, "seed") in spec["seeds"]
               and all(value_at(r, k) == v for k, v in (spec.get("select") or {}).items())]
    records.sort(key=lambda r: (r.get("started", ""), r["run_dir"]))
    want = {(c["task"], c["metric"], c["filter"]) for c in spec["cells"]}
    out: dict[int, dict] = {s: {} for s in spec["seeds"]}
    for rec in records:  # later records overwrite earlier ones
        seed = rec["config"]["seed"]
        for row in spec["rows"]:
            if not all(value_at(rec, k) == v for k, v in row["point"].items()):
                continue
            for r in (rec.get("metrics") or {}).get("results", []):
                if r["model"] == row["model"] and (r["task"], r["metric"], r.get("filter")) in want:
                    out[seed][(row["label"], r["task"])] = (float(r["value"]), float(r["stderr"] or 0.0), r.get("n"))
    return out


def pct(x) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def table(data: dict, spec: dict) -> str:
    from polyft.commands.report.stats import summarise

    seeds = spec["seeds"]
    head = "| model | " + " | ".join(f"s{s}" for s in seeds) + " | mean ± sd | SE (per seed) | SE (mean) |"
    lines = []
    for cell in spec["cells"]:
        task = cell["task"]
        n = next((c[2] for d in data.values() for k, c in d.items() if k[1] == task), "?")
        lines += [f"#### {task}: {cell['metric']} ({cell['filter']}), n = {n} per cell", "", head,
                  "|---" * (len(seeds) + 4) + "|"]
        for row in spec["rows"]:
            vals = [data[s].get((row["label"], task)) for s in seeds]
            got = [v for v in vals if v is not None]
            if not got:
                continue
            st = summarise([v[0] for v in got], [v[1] for v in got])
            spread = f"{pct(st.mean)} ± {pct(st.sd)}" if st.k > 1 else pct(st.mean)
            lines.append(f"| {row['label']} | " + " | ".join(pct(v[0]) if v else "—" for v in vals)
                         + f" | {spread} | {pct(sum(v[1] for v in got) / st.k)} | {pct(st.se)} |")
        lines.append("")
    return "\n".join(lines)


def diff(a, b) -> tuple[float, float]:
    """The difference of two cells and its standard error (independent binomial errors)."""
    return a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)


def two_se(t) -> str:
    return f"{100 * t[0]:+.1f} (2 SE = {200 * t[1]:.1f})"


def precondition(data: dict, spec: dict) -> tuple[list[int], str]:
    checks = spec.get("precondition") or []
    controls = spec.get("controls") or []
    head = [f"{c['row']} - {c['ref']} on {c['task']}" for c in checks] + \
        [f"(control) {c['row']} - {c['ref']} on {c['task']}" for c in controls]
    lines = ["| seed | " + " | ".join(head) + " | passes |", "|---" * (len(head) + 2) + "|"]
    ok = []
    for s in spec["seeds"]:
        c = data[s]
        try:
            res = [diff(c[(k["row"], k["task"])], c[(k["ref"], k["task"])]) for k in checks + controls]
        except KeyError as exc:
            lines.append(f"| {s} | missing cell {exc} |" + " |" * len(head))
            continue
        passed = all(d > 2 * e for d, e in res[: len(checks)])
        ok += [s] if passed else []
        lines.append(f"| {s} | " + " | ".join(two_se(t) for t in res) + f" | {'yes' if passed else 'no'} |")
    return ok, "\n".join(lines)


def compare(data: dict, seeds: list[int], row: str, ref, task: str) -> tuple[str, str]:
    """One comparison over the seeds read: its verdict and its line."""
    c = comparison(data, seeds, row, ref, task)
    return c["verdict"], line_of(c)


def line_of(c: dict) -> str:
    """A comparison as the full table writes it: per seed, then the mean and its SE."""
    return (f"{c['name']} on {c['task']}: per seed " + ", ".join(f"{100 * d:+.1f} (2 SE {200 * e:.1f})" for d, e in zip(c['ds'], c['ses']))
            + f"; mean {100 * c['mean']:+.1f}, SE {100 * c['se']:.1f} (item-pooled {100 * c['se_pool']:.1f}, seed sd/sqrt(n) "
            f"{100 * c['spread']:.1f}); seeds > 2 SE: {c['wins']}, < -2 SE: {c['losses']} -> {c['verdict']}")


def label(row: str, ref) -> str:
    refs = ref if isinstance(ref, list) else [ref]
    return f"{row} - " + (f"best of ({', '.join(refs)})" if len(refs) > 1 else refs[0])


def comparison(data: dict, seeds: list[int], row: str, ref, task: str) -> dict:
    """The numbers of one comparison row - ref (ref: a label, or a list: the best per seed)."""
    from polyft.commands.report.stats import se_of_mean

    refs = ref if isinstance(ref, list) else [ref]
    ds, ses = [], []
    for s in seeds:
        c = data[s]
        other = max((c[(r, task)] for r in refs), key=lambda v: v[0])
        d, se = diff(c[(row, task)], other)
        ds.append(d)
        ses.append(se)
    n = len(ds)
    mean = sum(ds) / n
    se_pool = se_of_mean(ses)
    spread = statistics.stdev(ds) / math.sqrt(n) if n > 1 else 0.0
    se_all = max(se_pool, spread)
    need = min(2, n)
    wins = sum(d > 2 * e for d, e in zip(ds, ses))
    losses = sum(d < -2 * e for d, e in zip(ds, ses))
    verdict = ("appears" if mean > 2 * se_all and wins >= need
               else "reversed" if mean < -2 * se_all and losses >= need else "not shown")
    return {"name": label(row, ref), "task": task, "ds": ds, "ses": ses, "mean": mean, "se": se_all, "se_pool": se_pool,
            "spread": spread, "wins": wins, "losses": losses, "verdict": verdict}


def decide(data: dict, seeds: list[int], spec: dict) -> tuple[str, list[dict]]:
    """The spec's rule over the seeds that passed the precondition: its verdict and its
    comparisons (none when it is not testable)."""
    rule = spec["rule"]
    if len(seeds) < min(2, len(spec["seeds"])):
        return "not testable", []
    found = [comparison(data, seeds, c["row"], c["ref"], c.get("task", rule.get("task"))) for c in rule["compare"]]
    verdicts = [c["verdict"] for c in found]
    need = rule.get("need", len(verdicts))
    up, down = verdicts.count("appears"), verdicts.count("reversed")
    verdict = ("appears" if up >= need and down == 0 else "reversed" if down >= need and up == 0 else "not shown")
    return verdict, found


NOT_TESTABLE = "too few seeds pass the precondition"


def render(data: dict, spec: dict) -> str:
    out = [f"### {spec['exp']}: {spec.get('title', '')} over seeds {spec['seeds']}".rstrip(), "",
           table(data, spec), "#### Precondition (row beats ref by > 2 SE of the difference)", ""]
    ok, pre = precondition(data, spec)
    out += [pre, ""]
    verdict, found = decide(data, ok, spec)
    why = "\n".join(line_of(c) for c in found) if found else NOT_TESTABLE
    need = spec["rule"].get("need", len(spec["rule"]["compare"]))
    out += [f"#### Decision rule (seeds read: {ok}; the effect appears when {need} of "
            f"{len(spec['rule']['compare'])} comparisons appear and none is reversed)", "", "```", why, "```", "",
            VERDICTS.get(verdict, f"**Not testable**: {why}.")]
    return "\n".join(out)


def brief(data: dict, spec: dict) -> str:
    """The table in a dozen lines (the README's form): each row on every cell as mean +- sd over
    seeds (one seed: the value and its SE), which seeds pass the precondition, each comparison
    of the rule as its mean and SE, and the verdict."""
    from polyft.commands.report.stats import summarise

    seeds = spec["seeds"]
    tasks = [c["task"] for c in spec["cells"]]
    n = next((c[2] for d in data.values() for c in d.values()), "?")
    lines = [f"{spec['exp']}: {spec.get('title', '')}; seeds {seeds}, n = {n} items per cell, "
             f"{'mean ± sd over seeds' if len(seeds) > 1 else 'value (SE)'}", "",
             "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for row in spec["rows"]:
        out = []
        for task in tasks:
            got = [data[s][(row["label"], task)] for s in seeds if (row["label"], task) in data[s]]
            if not got:
                out.append("—")
                continue
            st = summarise([v[0] for v in got], [v[1] for v in got])
            out.append(f"{pct(st.mean)} ± {pct(st.sd)}" if st.k > 1 else f"{pct(st.mean)} ({pct(st.se)})")
        lines.append(f"| {row['label']} | " + " | ".join(out) + " |")
    ok, _ = precondition(data, spec)
    checks = "; ".join(f"{c['row']} > {c['ref']} on {c['task']}" for c in spec.get("precondition") or [])
    lines += ["", f"Precondition ({checks}, each by > 2 SE): seeds {ok} of {seeds} pass.", ""]
    verdict, found = decide(data, ok, spec)
    rule = spec["rule"]
    need = rule.get("need", len(rule["compare"]))
    lines.append(f"Rule ({need} of {len(rule['compare'])} must appear, none reversed):")
    for c in rule["compare"] if not found else []:
        lines.append(f"- {label(c['row'], c['ref'])} on {c.get('task', rule.get('task'))}: not read")
    for r in found:
        lines.append(f"- {r['name']} on {r['task']}: {100 * r['mean']:+.1f} "
                     f"(SE {100 * r['se']:.1f}; {r['wins']} of {len(ok)} seeds beyond their 2 SE) -> {r['verdict']}")
    lines += ["", VERDICTS.get(verdict, f"**Not testable**: {NOT_TESTABLE}.")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a spec in scripts/powered/ (e.g. swap_powered_de)")
    ap.add_argument("--root", default="outputs")
    ap.add_argument("--brief", action="store_true", help="the short form the README shows")
    args = ap.parse_args(argv)
    spec = read_spec(args.name)
    data = load(Path(args.root), spec)
    missing = [s for s in spec["seeds"] if not data[s]]
    if missing:
        command = spec.get("command") or f"polyft run +exp={spec['exp']}"
        print(f"{spec['exp']}: no finished `polyft run` record for seed(s) {missing}; run: {command}",
              file=sys.stderr)
        return 2
    text = brief(data, spec) if args.brief else render(data, spec)
    print(text)
    report = Path(args.root) / "reports" / args.name
    report.mkdir(parents=True, exist_ok=True)
    (report / ("brief.md" if args.brief else "table.md")).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
