"""Report tables and plots from result rows (no model needed)."""

from __future__ import annotations

import csv
import io

import numpy as np

from polyft.commands.report import build_tables, task_family, to_csv, to_latex, to_markdown, write_report


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
    assert table.cell("base", "avg") == 0.25 and table.cell("base", "low") == 0.5
    assert table.cell("math", "sw") is None and table.cell("math", "avg") is None
    md = to_markdown(table)
    assert "| math | 25.0 | — | — | 25.0 | — |" in md
    parsed = list(csv.reader(io.StringIO(to_csv(table))))
    assert parsed[2][1:] == ["math", "0.25", "", "", "0.25", ""]
    assert "\\begin{tabular}" in to_latex(table) and "math & 25.0 & --" in to_latex(table)


def test_first_metric_per_family_unless_one_is_named():
    rows = [row("base", "x_en", "en", 0.1, "acc"), row("base", "x_en", "en", 0.2, "acc_norm")]
    assert [t.title for t in build_tables(rows)] == ["x: acc"]
    assert [t.title for t in build_tables(rows, "acc_norm")] == ["x: acc_norm"]


def test_plots_are_written_and_not_blank(tmp_path):
    import matplotlib.image as mpimg

    rows = []
    for b in (1, 2):
        for u in (0, 1):
            for lang, v in (("en", 0.1 * b), ("sw", 0.2 * u + 0.05)):
                rows.append(row(f"swap (bottom={b}, top={u})", f"t_{lang}", lang, v,
                                point={"merge.bottom": str(b), "merge.top": str(u)}))
    for r in (8, 16, 64):
        for q in ("4bit", "none"):
            rows.append(row(f"tuned (r={r}, quant={q})", "q_en", "en", r / 100 + (q == "none") * 0.1,
                            point={"adapter.r": str(r), "quant": q}))
    for r in rows:
        if r["variant"].startswith("swap"):
            r["model"] = "swap"
    summary = write_report(rows, tmp_path, merged_name="swap")
    names = sorted(p.split("/")[-1] for p in summary["plots"])
    assert names == ["adapter_r_q.png", "heatmap_t.png", "quant_q.png"], names
    for p in summary["plots"]:
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    assert (tmp_path / "table.md").read_text().count("### ") == 2
    assert (tmp_path / "table.csv").exists() and (tmp_path / "table.tex").exists()
