"""The powered layer-swap table: mean +- sd over training seeds per cell, the precondition
rows and the pre-registered decision rule (README, "Layer swapping, powered").

Reads only run records on disk (`polyft run +exp=swap_powered_<lang> seed=S`, status ok,
the latest per seed) and the result rows they carry; trains, merges and scores nothing.

    python scripts/swap_powered_table.py swap_powered_de [--root outputs] [--seeds 0 1 2]

Exit status 0 whatever the outcome; 2 when a seed's record is missing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

MODELS = ("base", "math", "lang", "swap", "soup")
METRIC, FILTER = "exact_match", "strict-match"


def load(root: Path, exp: str, seeds: list[int], bottom: int, top: int) -> dict:
    """seed -> {(model, task): (value, stderr, n)} from the latest ok run record per seed."""
    from polyft.runs import load_runs

    latest: dict[int, dict] = {}
    for rec in load_runs(root):
        cfg = rec.get("config") or {}
        merge = cfg.get("merge") or {}
        if (rec.get("command") != "run" or rec.get("status") != "ok" or cfg.get("exp_name") != exp
                or cfg.get("seed") not in seeds or merge.get("bottom") != bottom or merge.get("top") != top):
            continue
        prev = latest.get(cfg["seed"])
        if prev is None or rec["run_dir"] > prev["run_dir"] or rec.get("started", "") > prev.get("started", ""):
            latest[cfg["seed"]] = rec
    out = {}
    for seed, rec in latest.items():
        cells = {}
        for r in (rec.get("metrics") or {}).get("results", []):
            if r["metric"] == METRIC and r.get("filter") == FILTER:
                cells[(r["model"], r["task"])] = (float(r["value"]), float(r["stderr"] or 0.0), r.get("n"))
        out[seed] = cells
    return out


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def pct(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def table(data: dict, seeds: list[int], tasks: list[str]) -> str:
    head = "| model | " + " | ".join(f"s{s}" for s in seeds) + " | mean ± sd | SE (per seed) | SE (mean) |"
    lines = []
    for task in tasks:
        lines += [f"#### {task}: exact_match (strict), n = "
                  f"{next((c[2] for d in data.values() for k, c in d.items() if k[1] == task), '?')} per cell",
                  "", head, "|---" * (len(seeds) + 4) + "|"]
        for model in MODELS:
            vals = [data[s].get((model, task)) for s in seeds]
            if all(v is None for v in vals):
                continue
            got = [v for v in vals if v is not None]
            xs, ses = [v[0] for v in got], [v[1] for v in got]
            mean = sum(xs) / len(xs)
            cells = " | ".join(pct(v[0]) if v else "—" for v in vals)
            se_seed = sum(ses) / len(ses)
            se_mean = math.sqrt(sum(e * e for e in ses)) / len(ses)
            spread = f"{pct(mean)} ± {pct(sd(xs))}" if len(xs) > 1 else pct(mean)
            lines.append(f"| {model} | {cells} | {spread} | {pct(se_seed)} | {pct(se_mean)} |")
        lines.append("")
    return "\n".join(lines)


def beats(a, b) -> tuple[float, float, bool]:
    d, se = a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)
    return d, se, d > 2 * se


def precondition(data: dict, seeds: list[int], lang: str) -> tuple[list[int], str]:
    lines = ["| seed | math - base on toy_arith_en | lang - base on toy_numbers_" + lang
             + " | (control) lang - math on toy_numbers_" + lang + " | passes |", "|---|---|---|---|---|"]
    ok = []
    for s in seeds:
        c = data[s]
        try:
            m = beats(c[("math", "toy_arith_en")], c[("base", "toy_arith_en")])
            lg = beats(c[("lang", f"toy_numbers_{lang}")], c[("base", f"toy_numbers_{lang}")])
            ctl = beats(c[("lang", f"toy_numbers_{lang}")], c[("math", f"toy_numbers_{lang}")])
        except KeyError as exc:
            lines.append(f"| {s} | missing cell {exc} | | | no |")
            continue
        passed = m[2] and lg[2]
        ok += [s] if passed else []
        f = lambda t: f"{100 * t[0]:+.1f} (2 SE = {200 * t[1]:.1f})"  # noqa: E731
        lines.append(f"| {s} | {f(m)} | {f(lg)} | {f(ctl)} | {'yes' if passed else 'no'} |")
    return ok, "\n".join(lines)


def decide(data: dict, seeds: list[int], task: str) -> tuple[str, str]:
    """The README's rule on `task` over the seeds that passed the precondition."""
    if len(seeds) < 2:
        return "not testable", "fewer than two seeds pass the precondition"
    lines, verdicts = [], []
    for label in ("best", "soup"):
        ds, ses = [], []
        for s in seeds:
            c = data[s]
            swap = c[("swap", task)]
            other = max(c[("math", task)], c[("lang", task)], key=lambda v: v[0]) if label == "best" \
                else c[("soup", task)]
            d, se, _ = beats(swap, other)
            ds.append(d)
            ses.append(se)
        n = len(ds)
        mean = sum(ds) / n
        se_pool = math.sqrt(sum(e * e for e in ses)) / n
        se_all = max(se_pool, sd(ds) / math.sqrt(n) if n > 1 else 0.0)
        wins = sum(d > 2 * e for d, e in zip(ds, ses))
        losses = sum(d < -2 * e for d, e in zip(ds, ses))
        up = mean > 2 * se_all and wins >= 2
        down = mean < -2 * se_all and losses >= 2
        verdicts.append("appears" if up else "reversed" if down else "not shown")
        lines.append(f"swap - {label}: per seed " + ", ".join(f"{100 * d:+.1f} (2 SE {200 * e:.1f})"
                                                            for d, e in zip(ds, ses))
                     + f"; mean {100 * mean:+.1f}, SE {100 * se_all:.1f} (item-pooled {100 * se_pool:.1f}, "
                     f"seed sd/sqrt(n) {100 * sd(ds) / math.sqrt(n):.1f}); seeds > 2 SE: {wins}, "
                     f"< -2 SE: {losses} -> {verdicts[-1]}")
    verdict = ("appears" if all(v == "appears" for v in verdicts)
               else "reversed" if all(v == "reversed" for v in verdicts) else "not shown")
    return verdict, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exp", help="swap_powered_de or swap_powered_sw")
    ap.add_argument("--root", default="outputs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bottom", type=int, default=3)
    ap.add_argument("--top", type=int, default=1)
    args = ap.parse_args(argv)
    lang = args.exp.rsplit("_", 1)[-1]
    data = load(Path(args.root), args.exp, args.seeds, args.bottom, args.top)
    missing = [s for s in args.seeds if s not in data]
    if missing:
        print(f"{args.exp}: no finished `polyft run` record for seed(s) {missing}; run: "
              f"polyft run +exp={args.exp} -m seed={','.join(map(str, args.seeds))}", file=sys.stderr)
        return 2
    target = f"toy_wordarith_{lang}"
    tasks = [target, f"toy_arith_{lang}", f"toy_numbers_{lang}", "toy_arith_en"]
    out = [f"### {args.exp}: swap (bottom={args.bottom}, top={args.top}) over seeds {args.seeds}", "",
           table(data, args.seeds, tasks), "#### Precondition (each expert beats the base on its own skill by "
           "> 2 SE of the difference)", ""]
    ok, pre = precondition(data, args.seeds, lang)
    out += [pre, ""]
    verdict, why = decide(data, ok, target)
    out += [f"#### Decision rule on {target} (seeds read: {ok})", "", "```", why, "```", "",
            {"appears": "**The effect appears.**", "reversed": "**The effect is reversed (the swap loses).**",
             "not shown": "**The effect is not shown.**"}.get(verdict, f"**Not testable**: {why}.")]
    text = "\n".join(out)
    print(text)
    report = Path(args.root) / "reports" / args.exp
    report.mkdir(parents=True, exist_ok=True)
    (report / "seeds.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
