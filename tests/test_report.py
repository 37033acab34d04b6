"""`polyft report` on run directories written here as polyft writes them (run.json, .hydra
overrides, eval directories with results.jsonl, lm-eval samples and manifests): no model is
trained or scored. Every expected number is computed from the per-item outcomes the test
made up, not through the report's code."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from conftest import assert_user_error
from polyft.commands.report import build_tables, task_family, to_latex, to_markdown
from polyft.commands.report.stats import mcnemar_exact, paired_bootstrap, summarise
from polyft.errors import PolyftError

LANGS = ("en", "sw")
N = 40  # items per task


def outcomes(key: str, p: float) -> list[float]:
    rng = random.Random(key)
    return [float(rng.random() < p) for _ in range(N)]


def se(xs: list[float]) -> float:
    """lm-eval's standard error of a mean score: sample sd / sqrt(n)."""
    return statistics.stdev(xs) / math.sqrt(len(xs))


class Runs:
    """Run directories, eval directories and products on disk, and the truth behind them:
    truth[(artifact, task, metric, filter)] = the per-item 0/1 scores."""

    def __init__(self, root: Path):
        self.root = root
        self.truth: dict[tuple, list[float]] = {}
        self.clock = 0

    def artifact(self, name: str, skill: float, swap: tuple | None = None, samples: bool = True) -> str:
        """An eval directory of one model: words_<lang> (acc, acc_norm) and arith_<lang>
        (exact_match under two filters), each metric with its own outcomes."""
        path = self.root / "artifacts" / "eval" / name
        if path.exists():
            return str(path)
        model = self.root / "artifacts" / "merged" / name
        model.mkdir(parents=True)
        if swap:
            (model / "manifest.json").write_text(json.dumps(
                {"kind": "merged", "key": {"merge": {"method": "layer_swap", "bottom": swap[0], "top": swap[1]}}}))
        (path / "samples").mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps({"kind": "eval", "model": {"path": str(model)}}))
        rows = []
        for lang in LANGS:
            bump = 0.1 if lang == "sw" else 0.0
            for task, metrics in ((f"words_{lang}", (("acc", "none", skill), ("acc_norm", "none", skill / 2))),
                                  (f"arith_{lang}", (("exact_match", "strict-match", skill / 3),
                                                     ("exact_match", "flexible-extract", skill)))):
                lines = {}
                for metric, filt, p in metrics:
                    xs = outcomes(f"{name}/{task}/{metric}/{filt}", min(1.0, p + bump))
                    self.truth[(str(path), task, metric, filt)] = xs
                    rows.append({"model": name, "task": task, "lang": lang, "metric": metric, "filter": filt,
                                 "value": sum(xs) / N, "stderr": se(xs), "n": N})
                    for i, x in enumerate(xs):
                        lines.setdefault((i, filt), {"doc_id": i, "filter": filt, "doc_hash": f"{task}-{i}"})[metric] = x
                if samples:
                    (path / "samples" / f"{task}.jsonl").write_text(
                        "".join(json.dumps(v) + "\n" for v in lines.values()))
        (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def run(self, run_dir: str, overrides: list[str], models: dict[str, str], seed: int = 0, limit: int = N,
            config: dict | None = None) -> Path:
        d = self.root / run_dir
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            "".join(f"- {o}\n" for o in ["command=run", "+exp=toy", *overrides]))
        self.clock += 1
        tasks = [{"name": f"{fam}_{lang}", "lang": lang, "limit": limit} for fam in ("words", "arith") for lang in LANGS]
        record = {"command": "run", "status": "ok", "seed": seed, "started": f"2026-01-01T00:00:{self.clock:02d}",
                  "config": {"exp_name": "toy", "seed": seed, "eval": {"limit": limit}, **(config or {})},
                  "artifacts": [{"role": "eval", "path": p, "model": ref, "reused": False} for ref, p in models.items()],
                  "eval": {"tasks": tasks}}
        (d / "run.json").write_text(json.dumps(record))
        return d

    def cell(self, paths: list[str], task: str, metric: str, filt: str) -> tuple[float, float | None]:
        """(mean, sd) over runs of the percent score, from the outcomes."""
        values = [100 * sum(self.truth[(p, task, metric, filt)]) / N for p in paths]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def markdown_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """{title: {row: {column: cell text}}} of the Markdown a report printed or wrote."""
    out, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            out[title] = {}
        elif title and line.startswith("| model |"):
            header = [c.strip() for c in line.strip("|").split("|")][1:]
        elif title and header and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[title][cells[0]] = dict(zip(header, cells[1:]))
    return out


def rank_quant_sweep(runs: Runs) -> Path:
    """tuned over adapter.r x quant (and base, shared by every point); config_dirs is set and
    the same at every point (no axis)."""
    base = runs.artifact("base", 0.2)
    for i, (r, q) in enumerate((r, q) for r in (2, 16) for q in ("none", "4bit")):
        tuned = runs.artifact(f"tuned-r{r}-{q}", 0.25 + r / 40 - (q == "4bit") * 0.1)
        runs.run(f"rq/{i}", ["config_dirs=[/somewhere/conf]", f"adapter.r={r}", f"quant={q}"],
                 {"base": base, "tuned": tuned}, config={"adapter": {"r": r}, "quant": {"name": q}})
    (runs.root / "rq" / "multirun.yaml").write_text("{}\n")
    return runs.root / "rq"


def swap_sweep(runs: Runs, name: str = "depth", where: str = "sw") -> Path:
    """A layer swap named `name` over merge.bottom x merge.top, beside a soup shared by all."""
    soup = runs.artifact("soup", 0.4)
    for i, (b, t) in enumerate((b, t) for b in (1, 2, 3) for t in (0, 1)):
        swapped = runs.artifact(f"{name}-{b}-{t}", 0.1 + 0.1 * b + 0.05 * t, swap=(b, t))
        runs.run(f"{where}/{i}", [f"merge.bottom={b}", f"merge.top={t}"], {name: swapped, "soup": soup},
                 config={"merge": {"name": name, "method": "layer_swap", "bottom": b, "top": t}})
    (runs.root / where / "multirun.yaml").write_text("{}\n")
    return runs.root / where


# ------------------------------------------------------------------ the acceptance: plots = table cells

def test_every_plotted_value_is_its_table_cell(cli):
    runs = Runs(cli.cwd)
    rank_quant_sweep(runs)
    swap_sweep(runs, name="depth")  # not named `swap`: any layer-swap merge gets its heatmap
    reports = {}
    for sweep in ("rq", "sw"):
        proc = cli("report", f"report.dir={sweep}", f"report.out=report-{sweep}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = cli.cwd / f"report-{sweep}"
        assert f"polyft: report written to report-{sweep}: table.md, table.tex, results.csv" in proc.stdout
        reports[sweep] = (out, markdown_tables((out / "table.md").read_text()))
        assert markdown_tables(proc.stdout) == reports[sweep][1]  # printed = written

    rq, rq_tables = reports["rq"]
    assert sorted(p.name for p in rq.glob("*.png")) == sorted(
        [f"adapter_r_{fam}_tuned_quant={q}.png" for fam in ("words", "arith") for q in ("4bit", "none")]
        + [f"quant_{fam}_tuned_r={r}.png" for fam in ("words", "arith") for r in (2, 16)])
    sw, sw_tables = reports["sw"]
    assert sorted(p.name for p in sw.glob("*.png")) == ["heatmap_arith_depth.png", "heatmap_words_depth.png"]

    # short labels: the swept axes only, no config_dirs, no override that never changes
    assert list(rq_tables["words: acc"]) == ["base"] + [f"tuned (r={r}, quant={q})" for r in (2, 16)
                                                         for q in ("4bit", "none")]
    assert list(sw_tables["arith: exact_match (strict-match)"]) == \
        [f"depth (bottom={b}, top={t})" for b in (1, 2, 3) for t in (0, 1)] + ["soup"]

    checked = 0
    for out, tables in reports.values():
        for f in sorted(out.glob("*.json")):
            if f.name == "report.json":
                continue
            d = json.loads(f.read_text())
            assert f.with_suffix(".png").is_file()
            table = tables[d["table"]]
            metric, filt = d["metric"], d["filter"]
            # the table's own metric and filter: acc (not acc_norm), strict-match (not flexible-extract)
            assert (metric, filt) == {"words": ("acc", "none"), "arith": ("exact_match", "strict-match")}[d["family"]]
            assert d["unit"] == "%"
            if d["kind"] == "lines":
                assert sorted(d["series"]) == sorted(LANGS)  # one series per language
                for lang, points in d["series"].items():
                    assert [p["row"].split(" ")[0] for p in points] == ["tuned"] * len(points)  # one model only
                    for p in points:
                        path = str(cli.cwd / "artifacts" / "eval" / _artifact_of(p["row"]))
                        want, _ = runs.cell([path], f"{d['family']}_{lang}", metric, filt)
                        assert p["value"] == pytest.approx(want, abs=1e-9), (f.name, p)
                        assert table[p["row"]][lang] == p["text"] == f"{want:.1f}"
                        checked += 1
                axis = d["axis"]
                assert [str(p["x"]) for p in d["series"]["en"]] == (["2", "16"] if axis == "adapter.r"
                                                                     else ["4bit", "none"])
            else:
                assert d["colorbar"] == [0.0, 100.0]
                assert {(c["bottom"], c["top"]) for c in d["cells"]} == {(b, t) for b in (1, 2, 3) for t in (0, 1)}
                for c in d["cells"]:
                    path = str(cli.cwd / "artifacts" / "eval" / f"depth-{c['bottom']}-{c['top']}")
                    want = statistics.mean(runs.cell([path], f"{d['family']}_{lang}", metric, filt)[0] for lang in LANGS)
                    assert c["row"] == f"depth (bottom={c['bottom']}, top={c['top']})"
                    assert c["value"] == pytest.approx(want, abs=1e-9)
                    assert table[c["row"]]["avg"] == c["text"] == f"{want:.1f}"
                    checked += 1
    # every point of every figure: per family, 2 rank plots (one per quant) of 2 points and
    # 2 quant plots (one per rank) of 2 points, per language; a heatmap of 6 cells
    assert checked == 2 * (2 * 2 + 2 * 2) * len(LANGS) + 2 * 6


def _artifact_of(row: str) -> str:
    """'tuned (r=8, quant=4bit)' -> 'tuned-r8-4bit' (how rank_quant_sweep names them)."""
    inner = dict(kv.split("=") for kv in row[row.index("(") + 1:-1].split(", "))
    return f"tuned-r{inner['r']}-{inner['quant']}"


def test_the_tidy_csv_holds_every_result_in_percent_with_its_stderr(cli):
    runs = Runs(cli.cwd)
    swap_sweep(runs, name="swap")
    proc = cli("report", "report.dir=sw", "report.out=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = list(csv.DictReader(io.StringIO((cli.cwd / "out" / "results.csv").read_text())))
    assert list(lines[0]) == ["row", "model", "point", "seed", "task", "family", "lang", "metric", "filter", "value",
                              "stderr", "n", "unit", "zero_shot", "artifact"]
    # every (row, task, metric, filter) once: 6 swaps + 1 soup, 4 tasks, 2 metric/filter pairs each
    assert len(lines) == 7 * 4 * 2
    assert len({(r["row"], r["task"], r["metric"], r["filter"]) for r in lines}) == len(lines)
    for r in lines:
        xs = runs.truth[(r["artifact"], r["task"], r["metric"], r["filter"])]
        assert float(r["value"]) == pytest.approx(100 * sum(xs) / N)
        assert float(r["stderr"]) == pytest.approx(100 * se(xs))
        assert r["unit"] == "%" and r["n"] == str(N) and r["seed"] == ""
        assert r["family"] == r["task"].rsplit("_", 1)[0] and r["lang"] == r["task"].rsplit("_", 1)[1]
    one = next(r for r in lines if r["row"] == "swap (bottom=2, top=1)")
    assert one["model"] == "swap" and one["point"] == "merge.bottom=2 merge.top=1"


# ------------------------------------------------------------------ statistics

def test_seeds_fold_into_mean_and_sd_and_stderr_on_request(cli):
    runs = Runs(cli.cwd)
    base = runs.artifact("base", 0.2)
    paths = {}
    for i, (r, s) in enumerate((r, s) for r in (2, 8) for s in (1, 2, 3)):
        paths.setdefault(r, []).append(runs.artifact(f"tuned-r{r}-s{s}", 0.2 + r / 20 + s / 20))
        runs.run(f"seeds/{i}", [f"adapter.r={r}", f"seed={s}"], {"base": base, "tuned": paths[r][-1]}, seed=s,
                 config={"adapter": {"r": r}})
    (cli.cwd / "seeds" / "multirun.yaml").write_text("{}\n")
    proc = cli("report", "report.dir=seeds", "report.stderr=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = markdown_tables(proc.stdout)["words: acc"]
    assert list(table) == ["base", "tuned (r=2)", "tuned (r=8)"]  # seed is folded, not a label
    for r in (2, 8):
        for lang in LANGS:
            values = [100 * sum(runs.truth[(p, f"words_{lang}", "acc", "none")]) / N for p in paths[r]]
            ses = [100 * se(runs.truth[(p, f"words_{lang}", "acc", "none")]) for p in paths[r]]
            se_mean = math.sqrt(sum(e * e for e in ses)) / 3
            want = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (SE {se_mean:.1f})"
            assert table[f"tuned (r={r})"][lang] == want
        # the average over languages: per seed, then mean +- sd over seeds
        per_seed = [statistics.mean(100 * sum(runs.truth[(p, f"words_{lang}", "acc", "none")]) / N for lang in LANGS)
                    for p in paths[r]]
        assert table[f"tuned (r={r})"]["avg"].startswith(
            f"{statistics.mean(per_seed):.1f} ± {statistics.stdev(per_seed):.1f} (SE ")
    base_en = runs.truth[(base, "words_en", "acc", "none")]
    assert table["base"]["en"] == f"{100 * sum(base_en) / N:.1f} (SE {100 * se(base_en):.1f})"
    assert "mean ± sd over seeds 1, 2, 3: tuned (r=2), tuned (r=8)" in proc.stdout
    # the rank plot shows the seed mean and its sd
    d = json.loads((cli.cwd / "outputs" / "reports" / "latest" / "adapter_r_words_tuned.json").read_text())
    en = d["series"]["en"]
    values = [100 * sum(runs.truth[(p, "words_en", "acc", "none")]) / N for p in paths[8]]
    assert en[1]["value"] == pytest.approx(statistics.mean(values)) and en[1]["sd"] == pytest.approx(statistics.stdev(values))
    # the CSV keeps one line per seed
    lines = list(csv.DictReader(io.StringIO((cli.cwd / "outputs" / "reports" / "latest" / "results.csv").read_text())))
    got = [r["seed"] for r in lines if r["row"] == "tuned (r=2)" and r["task"] == "words_en" and r["metric"] == "acc"]
    assert sorted(got) == ["1", "2", "3"]


def mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact binomial test of b successes in b + c trials at p = 1/2."""
    n = b + c
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def test_compare_pairs_the_same_items_against_a_reference_row(cli):
    runs = Runs(cli.cwd)
    swap_sweep(runs, name="swap")
    proc = cli("report", "report.dir=sw", "report.compare=soup", "report.out=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### words: acc: each row − soup, on the same items" in proc.stdout
    lines = list(csv.DictReader(io.StringIO((cli.cwd / "out" / "compare.csv").read_text())))
    soup = str(cli.cwd / "artifacts" / "eval" / "soup")
    for r in lines:
        if r["column"] == "avg":
            continue
        metric, filt = r["metric"], r["filter"]
        task = f"{r['family']}_{r['column']}"
        b_, t_ = (int(x) for x in r["row"][r["row"].index("(") + 1:-1].replace("bottom=", "").replace("top=", "").split(", "))
        x = runs.truth[(str(cli.cwd / "artifacts" / "eval" / f"swap-{b_}-{t_}"), task, metric, filt)]
        y = runs.truth[(soup, task, metric, filt)]
        b = sum(1 for u, v in zip(x, y) if u == 1 and v == 0)
        c = sum(1 for u, v in zip(x, y) if u == 0 and v == 1)
        assert (int(r["only_row_right"]), int(r["only_reference_right"])) == (b, c)
        assert float(r["diff"]) == pytest.approx(100 * (sum(x) - sum(y)) / N)
        assert float(r["p_mcnemar"]) == pytest.approx(mcnemar_by_hand(b, c), rel=1e-6)
        assert float(r["ci_low"]) <= float(r["diff"]) <= float(r["ci_high"])
    md = markdown_tables(proc.stdout)["words: acc: each row − soup, on the same items"]
    assert list(md) == [f"swap (bottom={b}, top={t})" for b in (1, 2, 3) for t in (0, 1)]
    assert md["swap (bottom=3, top=1)"]["en"].startswith("+") and " p=" in md["swap (bottom=3, top=1)"]["en"]


def test_compare_refuses_an_unknown_row_or_one_without_items(cli):
    runs = Runs(cli.cwd)
    swap_sweep(runs)
    proc = cli("report", "report.dir=sw", "report.compare=nope")
    assert_user_error(proc, "report.compare=nope", "soup", "depth (bottom=1, top=0)")
    plain = runs.artifact("plain", 0.3, samples=False)
    runs.run("lone/0", [], {"plain": plain, "soup": runs.artifact("soup", 0.4)})
    proc = cli("report", "report.dir=lone", "report.compare=plain")
    assert_user_error(proc, "report.compare=plain", "eval.log_samples=true")
    proc = cli("report", "report.dir=lone", "report.compare=")
    assert_user_error(proc, "report.compare")
    assert not (cli.cwd / "outputs").exists() or not any((cli.cwd / "outputs").rglob("run.json"))
    assert not (cli.cwd / "outputs" / "reports").exists()


def test_a_run_s_own_report_leaves_out_a_comparison_it_cannot_make(tmp_path):
    """`polyft run -m ... report.compare='swap (bottom=1, top=0)'`: each point's report has no
    such row (the sweep's has), so it is written without the comparison, not failed."""
    from omegaconf import OmegaConf

    from polyft.commands.report import Scope, report_runs, select
    from polyft.runs import load_runs

    runs = Runs(tmp_path)
    swap_sweep(runs, name="swap")
    cfg = OmegaConf.create({"report": {"metric": None, "groups": {}, "stderr": False,
                                       "compare": "swap (bottom=1, top=0)"}})
    point = [r for r in load_runs(tmp_path / "sw") if r["run_dir"].endswith("/0")]
    assert report_runs(Scope(point), tmp_path / "point", cfg, lenient=True)["tables"] == 2
    assert not (tmp_path / "point" / "compare.csv").exists() and (tmp_path / "point" / "table.md").is_file()
    with pytest.raises(PolyftError, match="no such row"):
        report_runs(Scope(point), tmp_path / "strict", cfg)
    whole = report_runs(select(load_runs(tmp_path / "sw")), tmp_path / "sweep", cfg, lenient=True)
    assert (tmp_path / "sweep" / "compare.csv").is_file() and "each row − swap (bottom=1, top=0)" in whole["markdown"]


def test_mcnemar_and_bootstrap_against_their_formulas():
    for b, c in ((0, 0), (3, 0), (5, 9), (17, 4), (40, 41), (120, 90)):
        assert mcnemar_exact(b, c) == pytest.approx(mcnemar_by_hand(b, c), rel=1e-12)
    try:
        from scipy.stats import binomtest
    except ImportError:
        binomtest = None
    if binomtest is not None:
        for b, c in ((5, 9), (17, 4), (120, 90)):
            assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    rng = random.Random(3)
    d = [rng.choice((-1.0, 0.0, 0.0, 1.0, 1.0)) for _ in range(2000)]
    diff, low, high = paired_bootstrap([d], resamples=4000)
    half = 1.959964 * statistics.stdev(d) / math.sqrt(len(d))  # normal approximation, large n
    assert diff == pytest.approx(statistics.mean(d))
    assert low == pytest.approx(diff - half, abs=0.15 * half) and high == pytest.approx(diff + half, abs=0.15 * half)
    # two strata: the mean of the strata's means, each resampled on its own
    e = [rng.choice((0.0, 1.0)) for _ in range(500)]
    diff2, low2, high2 = paired_bootstrap([d, e], resamples=4000)
    assert diff2 == pytest.approx((statistics.mean(d) + statistics.mean(e)) / 2)
    half2 = 1.959964 * math.sqrt(statistics.variance(d) / len(d) + statistics.variance(e) / len(e)) / 2
    assert high2 - low2 == pytest.approx(2 * half2, rel=0.15)
    s = summarise([0.2, 0.5, 0.4], [0.03, 0.04, None])
    assert s.mean == pytest.approx(statistics.mean([0.2, 0.5, 0.4])) and s.sd == pytest.approx(statistics.stdev([0.2, 0.5, 0.4]))
    assert s.se is None and summarise([0.2, 0.5], [0.03, 0.04]).se == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)


# ------------------------------------------------------------------ scope, labels, paths

def test_default_scope_is_the_latest_run_and_limits_never_mix(cli):
    runs = Runs(cli.cwd)
    (cli.cwd / "conf" / "exp").mkdir(parents=True)  # the user's experiment (./conf is searched)
    (cli.cwd / "conf" / "exp" / "toy.yaml").write_text("# @package _global_\nexp_name: toy\n")
    swap_sweep(runs, name="swap", where="outputs/multirun/sw")  # limit 40
    merge = {"merge": {"name": "swap", "method": "layer_swap", "bottom": 2, "top": 1}}
    runs.clock = 0  # the oldest: a run of the same merge at another limit
    runs.run("outputs/runs/run/old", ["eval.limit=5"], {"swap": runs.artifact("swap-2-1-limit5", 0.3, swap=(2, 1))},
             limit=5, config=merge)
    runs.clock = 50  # the newest: point 3 of the sweep again, on its own (no overrides)
    runs.run("outputs/runs/run/single", [], {"swap": runs.artifact("swap-2-1", 0, swap=(2, 1))}, config=merge)

    latest = cli("report")  # the latest run only
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert list(markdown_tables(latest.stdout)["words: acc"]) == ["swap"]
    assert "polyft: report written to outputs/reports/latest: table.md, table.tex, results.csv" in latest.stdout

    # the experiment: the sweep and the single run (the same merge as point 3: one row, one
    # label), the limit-5 run left out with one line
    proc = cli("report", "+exp=toy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = markdown_tables(proc.stdout)["words: acc"]
    assert list(table) == [f"swap (bottom={b}, top={t})" for b in (1, 2, 3) for t in (0, 1)] + ["soup"]
    left = [line for line in proc.stdout.splitlines() if "left out" in line]
    assert len(left) == 1 and "1 run(s) evaluated with eval.limit=5 (this report: eval.limit=40)" in left[0], left
    assert "polyft: report written to outputs/reports/toy: table.md" in proc.stdout
    lines = list(csv.DictReader(io.StringIO((cli.cwd / "outputs" / "reports" / "toy" / "results.csv").read_text())))
    assert {r["n"] for r in lines} == {str(N)}  # no limit-5 score anywhere


def test_run_records_where_each_report_went_and_an_old_figure_does_not_stay(cli):
    runs = Runs(cli.cwd)
    swap_sweep(runs, name="swap")
    assert cli("report", "report.dir=sw", "report.out=out").returncode == 0
    assert (cli.cwd / "out" / "heatmap_words_swap.png").is_file()
    # the next report into the same directory: no swap depth any more, so no heatmap beside it
    runs.run("one/0", [], {"soup": runs.artifact("soup", 0.4)})
    proc = cli("report", "report.dir=one", "report.out=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((cli.cwd / "out").glob("heatmap_*"))
    records = [json.loads(f.read_text()) for f in (cli.cwd / "outputs" / "runs" / "report").rglob("run.json")]
    assert len(records) == 2
    for record in records:
        assert Path(cli.cwd, record["metrics"]["report"]["dir"]).resolve() == (cli.cwd / "out").resolve()
        assert [a["role"] for a in record["artifacts"]] == ["report"]


# ------------------------------------------------------------------ drawing

def test_figures_are_readable(tmp_path):
    from polyft.commands.report.plots import draw_heatmap, draw_lines

    long = "a_rather_long_task_family_name: exact_match (strict-match): some_merge_name (transition_bottom=1), by LoRA rank"
    lines = {"kind": "lines", "title": long, "metric": "exact_match", "unit": "%", "xlabel": "LoRA rank", "numeric": True,
             "series": {"en": [{"x": 2, "value": 10.0, "sd": None}, {"x": 64, "value": 30.0, "sd": 2.0}]}}
    heat = {"kind": "heatmap", "title": long, "metric": "chrf", "unit": "", "colorbar": [4.5, 5.5],
            "cells": [{"bottom": b, "top": t, "value": 5.0, "text": "5.00"} for b in (1, 2) for t in (0, 1)]}
    for fig in (draw_lines(lines), draw_heatmap(heat)):
        fig.canvas.draw()
        box = fig.bbox
        title = fig.axes[0].title.get_window_extent()
        assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1, (title, box)  # not cut off
    im = draw_heatmap(heat).axes[0].images[0]
    assert im.get_clim() == (4.5, 5.5)


def test_a_constant_map_gets_a_real_colour_bar_and_percent_maps_0_to_100():
    from polyft.commands.report.plots import heatmap_data

    def rows(metric, value):
        return [{"variant": f"s (bottom={b}, top={t})", "model": "s", "task": f"x_{lang}", "lang": lang, "metric": metric,
                 "filter": "none", "value": value, "stderr": None, "n": 10, "point": {"merge.bottom": b, "merge.top": t},
                 "swap": (b, t)} for b in (1, 2) for t in (0, 1) for lang in ("en", "sw")]

    (zero,) = build_tables(rows("acc", 0.0))
    assert heatmap_data(zero)[0]["colorbar"] == [0.0, 100.0]
    (chrf,) = build_tables(rows("chrf", 42.0))
    d = heatmap_data(chrf)[0]
    assert d["colorbar"] == [0.0, 100.0] and d["cells"][0]["text"] == "42.00"
    (ppl,) = build_tables(rows("perplexity", 7.0))
    low, high = heatmap_data(ppl)[0]["colorbar"]
    assert low < 7.0 < high and high - low >= 1.0


# ------------------------------------------------------------------ tables

def row(variant, task, lang, value, metric="exact_match", point=None):
    return {"variant": variant, "model": variant.split(" ")[0], "task": task, "lang": lang, "metric": metric,
            "filter": "none", "value": value, "stderr": 0.0, "n": 10, "point": point or {}}


def test_task_family_strips_language():
    assert task_family("mgsm_direct_sw", "sw") == "mgsm_direct"
    assert task_family("belebele_swh_Latn", None) == "belebele"
    assert task_family("xnli_en", None) == "xnli"


def test_missing_cells_stay_missing_and_groups_average():
    rows = [row("base", "demo_arith_en", "en", 0.0), row("base", "demo_arith_sw", "sw", 0.5),
            row("math", "demo_arith_en", "en", 0.25)]
    (table,) = build_tables(rows)
    assert table.langs == ["en", "sw"] and table.columns() == ["en", "sw", "avg", "high", "low"]
    assert table.cell("base", "avg").mean == 25.0 and table.cell("base", "low").mean == 50.0
    assert table.cell("math", "sw") is None and table.cell("math", "avg") is None
    md = to_markdown(table)
    assert "| math | 25.0 | — | — | 25.0 | — |" in md
    assert "\\begin{tabular}" in to_latex(table) and "math & 25.0 & --" in to_latex(table)


def test_first_metric_per_family_unless_one_is_named():
    rows = [row("base", "x_en", "en", 0.1, "acc"), row("base", "x_en", "en", 0.2, "acc_norm")]
    assert [t.title for t in build_tables(rows)] == ["x: acc"]
    assert [t.title for t in build_tables(rows, "acc_norm")] == ["x: acc_norm"]
