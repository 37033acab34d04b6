"""Report figures, drawn from the table cells themselves.

Each figure is made from one table (one task family, metric and filter) and one model's rows
in it, so a plotted value is a cell of the table, in the table's unit:
- lines: the score against a swept LoRA rank (adapter.r) or quantisation (quant), one line per
  language (error bars: sd over seeds when the row folds seeds);
- heatmap: a layer-swap merge's average over the table's languages (the avg column) at each
  bottom x top depth, whatever the merge is named.
A model swept along other axes too gets one figure per value of those (`..._quant=4bit.png`).
Beside each PNG a JSON file of the same name holds the numbers it was drawn from, with the
table row and column each comes from.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from polyft.commands.report.tables import Table, show

LINE_AXES = {"adapter.r": "LoRA rank", "quant": "quantisation"}
_SWAP_KEYS = ("bottom", "top")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", str(text)).strip("-")


def _slice_text(s: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in s.items())


def _number(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _by_model_and_slice(t: Table, keep) -> dict[tuple, list[str]]:
    """(model, the row's other axis values as JSON) -> the variants of that model in t."""
    groups: dict[tuple, list[str]] = {}
    for variant, meta in t.meta.items():
        rest = keep(meta)
        if rest is not None:
            groups.setdefault((meta["model"], json.dumps(rest, sort_keys=True, default=str)), []).append(variant)
    return groups


def line_data(t: Table) -> list[dict]:
    out = []
    for axis, xlabel in LINE_AXES.items():
        groups = _by_model_and_slice(t, lambda m, a=axis: {k: v for k, v in m["point"].items() if k != a}
                                     if a in m["point"] else None)
        for (model, rest), variants in groups.items():
            xs = [t.meta[v]["point"][axis] for v in variants]
            if len(set(map(str, xs))) < 2:
                continue
            numeric = all(_number(x) is not None for x in xs)
            order = sorted(zip(xs, variants), key=lambda p: (_number(p[0]) if numeric else str(p[0])))
            series = {}
            for lang in t.langs:
                points = []
                for x, variant in order:
                    stat = t.cell(variant, lang)
                    if stat is not None:
                        points.append({"x": x, "row": variant, "column": lang, "value": stat.mean, "sd": stat.sd,
                                       "text": show(stat, t.scale)})
                if points:
                    series[lang] = points
            slice_ = json.loads(rest)
            title = f"{t.title} — {model}" + (f" ({_slice_text(slice_)})" if slice_ else "") + f", by {xlabel}"
            name = f"{_slug(axis.replace('.', '_'))}_{_slug(t.family)}_{_slug(model)}" + \
                (f"_{_slug(_slice_text(slice_).replace(', ', '_'))}" if slice_ else "")
            out.append({"kind": "lines", "name": name, "title": title, "table": t.title, "family": t.family,
                        "metric": t.metric, "filter": t.filter, "unit": t.unit, "model": model, "axis": axis,
                        "xlabel": xlabel, "numeric": numeric, "slice": slice_, "series": series})
    return out


def heatmap_data(t: Table) -> list[dict]:
    out = []
    groups = _by_model_and_slice(t, lambda m: None if not m.get("swap") else
                                 {k: v for k, v in m["point"].items() if k.rsplit(".", 1)[-1] not in _SWAP_KEYS})
    for (model, rest), variants in groups.items():
        depths = {tuple(t.meta[v]["swap"]) for v in variants}
        if len(depths) < 2:
            continue
        cells = []
        for variant in variants:
            stat = t.cell(variant, "avg")
            if stat is not None:
                b, u = t.meta[variant]["swap"]
                cells.append({"bottom": b, "top": u, "row": variant, "column": "avg", "value": stat.mean,
                              "text": show(stat, t.scale)})
        if not cells:
            continue
        values = [c["value"] for c in cells]
        low, high = t.bounds() or (min(values), max(values))
        if high - low <= 0:  # one value everywhere: a unit-wide bar around it, not a zero-width one
            low, high = low - 0.5, high + 0.5
        slice_ = json.loads(rest)
        title = (f"{t.title} — {model}" + (f" ({_slice_text(slice_)})" if slice_ else "")
                 + f", mean over {', '.join(t.group('avg'))}")
        name = f"heatmap_{_slug(t.family)}_{_slug(model)}" + \
            (f"_{_slug(_slice_text(slice_).replace(', ', '_'))}" if slice_ else "")
        out.append({"kind": "heatmap", "name": name, "title": title, "table": t.title, "family": t.family,
                    "metric": t.metric, "filter": t.filter, "unit": t.unit, "model": model, "slice": slice_,
                    "colorbar": [low, high], "cells": sorted(cells, key=lambda c: (c["bottom"], c["top"]))})
    return out


# ------------------------------------------------------------------ drawing

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(d: dict) -> str:
    return f"{d['metric']} ({d['unit']})" if d["unit"] else d["metric"]


def _title(text: str) -> str:
    return textwrap.fill(text, width=56)


def draw_lines(d: dict):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    xs_all = sorted({str(p["x"]) for s in d["series"].values() for p in s},
                    key=lambda x: float(x) if d["numeric"] else x)
    for n, (lang, points) in enumerate(d["series"].items()):
        pos = [float(p["x"]) if d["numeric"] else xs_all.index(str(p["x"])) for p in points]
        sd = [p["sd"] or 0.0 for p in points]
        # a marker of its own per language: languages with equal scores still show apart
        ax.errorbar(pos, [p["value"] for p in points], yerr=sd if any(sd) else None, marker=_MARKERS[n % len(_MARKERS)],
                    markersize=9 - 1.5 * (n % 4), capsize=3, label=lang)  # later ones smaller, on top
    if d["numeric"] and all(float(x) > 0 for x in xs_all):
        ax.set_xscale("log", base=2)
    ax.set_xticks([float(x) for x in xs_all] if d["numeric"] else range(len(xs_all)), xs_all)
    ax.minorticks_off()
    if not d["numeric"]:
        ax.set_xlim(-0.5, len(xs_all) - 0.5)
    ax.set_xlabel(d["xlabel"])
    ax.set_ylabel(_label(d))
    ax.set_title(_title(d["title"]), fontsize="medium")
    ax.legend(fontsize="small", title="language", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def draw_heatmap(d: dict):
    import numpy as np

    plt = _plt()
    bottoms = sorted({c["bottom"] for c in d["cells"]})
    tops = sorted({c["top"] for c in d["cells"]})
    grid = np.full((len(bottoms), len(tops)), np.nan)
    for c in d["cells"]:
        grid[bottoms.index(c["bottom"]), tops.index(c["top"])] = c["value"]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.1 * len(tops) + 3), max(3.6, 0.8 * len(bottoms) + 2.4)),
                           layout="constrained")
    low, high = d["colorbar"]
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=low, vmax=high)
    ax.set_xticks(range(len(tops)), [str(u) for u in tops])
    ax.set_yticks(range(len(bottoms)), [str(b) for b in bottoms])
    ax.set_xlabel("top layers swapped")
    ax.set_ylabel("bottom layers swapped")
    for c in d["cells"]:
        r, g, b, _ = im.cmap(im.norm(c["value"]))
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(tops.index(c["top"]), bottoms.index(c["bottom"]), c["text"], ha="center", va="center", color=ink)
    fig.colorbar(im, ax=ax, label=_label(d))
    ax.set_title(_title(d["title"]), fontsize="medium")
    return fig


def plot_data(t: Table) -> list[dict]:
    return line_data(t) + heatmap_data(t)


def write_plots(tables: list[Table], out_dir: Path) -> list[Path]:
    """Every figure of every table as PNG, with its numbers as JSON beside it."""
    plt = None
    written = []
    for t in tables:
        for d in plot_data(t):
            plt = plt or _plt()
            fig = draw_lines(d) if d["kind"] == "lines" else draw_heatmap(d)
            png = out_dir / f"{d['name']}.png"
            fig.savefig(png, dpi=100)
            plt.close(fig)
            png.with_suffix(".json").write_text(json.dumps(d, indent=1, ensure_ascii=False, default=str) + "\n",
                                                encoding="utf-8")
            written.append(png)
    return written
