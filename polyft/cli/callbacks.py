"""Hydra callbacks polyft registers in conf/config.yaml (hydra.callbacks)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from polyft.commands.report import report_runs, select, where
from polyft.runs import load_runs


class SweepReport(Callback):
    """After a sweep, in the launching process, once: the tables its points left to it (a
    report over all of `polyft run -m`'s points, heatmap included; each point's eval rows of
    `polyft eval -m`), and where the sweep's tracked runs are."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = [r for r in load_runs(sweep_dir) if r.get("status") == "ok"]
        if config.get("command") == "run":
            summary = report_runs(select(load_runs(sweep_dir)), sweep_dir / "report", config, lenient=True)
            if summary:
                print(summary["markdown"])
                print(where(summary).replace("polyft: report", "polyft: sweep report", 1))
        elif config.get("command") == "eval":
            from polyft.eval.harness import format_rows

            for r in sorted(runs, key=lambda r: int(Path(r["run_dir"]).name) if Path(r["run_dir"]).name.isdigit() else 0):
                if r.get("metrics", {}).get("results"):
                    print(f"# point {(r.get('sweep') or {}).get('point') or r['run_dir']}")
                    print(format_rows(r["metrics"]["results"]))
        tracked = [t for r in runs for t in r.get("tracking", [])]
        if any(t["tool"] == "wandb" and t.get("mode") == "offline" for t in tracked):
            print(f"polyft: the sweep's W&B offline runs: wandb sync {sweep_dir.resolve()}/*/wandb/offline-run-*")
        if any(t["tool"] == "tensorboard" for t in tracked):
            print(f"polyft: the sweep's TensorBoard logs: tensorboard --logdir {sweep_dir.resolve()}")
