"""Hydra callbacks polyft registers in conf/config.yaml (hydra.callbacks)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from polyft.commands.report import collect, groups_of, write_report
from polyft.runs import load_runs


class SweepReport(Callback):
    """After `polyft run -m ...`, in the launching process: one report over all the sweep's
    points (heatmap included)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("command") != "run":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect([r for r in load_runs(sweep_dir) if r.get("status") == "ok"])
        if rows:
            summary = write_report(rows, sweep_dir / "report", config.report.metric,
                                   config.merge.name or config.merge.method, groups_of(config))
            print(summary["markdown"])
            print(f"polyft: sweep report in {summary['dir']}")
