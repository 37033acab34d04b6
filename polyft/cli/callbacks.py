"""Hydra callbacks polyft registers in conf/config.yaml (hydra.callbacks)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from polyft.commands.report import report_runs, select, where
from polyft.runs import load_runs


class SweepReport(Callback):
    """After `polyft run -m ...`, in the launching process: one report over all the sweep's
    points (heatmap included)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("command") != "run":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = report_runs(select(load_runs(sweep_dir)), sweep_dir / "report", config, lenient=True)
        if summary:
            print(summary["markdown"])
            print(where(summary).replace("polyft: report", "polyft: sweep report", 1))
