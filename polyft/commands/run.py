"""`polyft run +exp=NAME`: an experiment's stages in order, each skipped when its product exists.

1. train every expert the experiment names;
2. make its merges (the main `merge`, then each of `baselines`);
3. evaluate base, each expert and each merge on the experiment's suite;
4. print the report table for this run (a sweep also gets one over all its points).
"""

from __future__ import annotations

from pathlib import Path

from polyft import console
from polyft.commands import eval as eval_command
from polyft.commands import merge as merge_command
from polyft.commands import report, train
from polyft.config.experiment import check_swap_depths
from polyft.config.schema import option_names
from polyft.errors import PolyftError
from polyft.models.load import model_depth


def preflight(cfg) -> None:
    """Refuse an experiment that cannot run, before anything is written: what training
    reads (merges and evals read products that do not exist yet)."""
    if not cfg.exp_name:
        raise PolyftError("polyft run needs an experiment: +exp=NAME; available: "
                          + ", ".join(option_names("exp", cfg.config_dirs)))
    train.preflight(cfg)
    # a model named by its path alone (model=hf) has its depth in its config.json, not the config
    check_swap_depths(cfg, lambda m: model_depth(m, cfg.output_root, cfg.offline))


def command(cfg, record) -> None:
    train.command(cfg, record)
    merge_command.preflight(cfg)  # the experts exist only now: the CLI could not read them
    merge_command.command(cfg, record)
    eval_command.command(cfg, record, show_rows=False)  # the report table follows
    record.save()
    this_run = report.Scope([{**record.as_dict(), "run_dir": str(record.run_dir)}])
    summary = report.report_runs(this_run, Path(record.run_dir) / "report", cfg, lenient=True)
    if summary:
        if record.extra.get("sweep"):  # the sweep's report comes once, at its end (polyft.cli.callbacks)
            console.echo(f"polyft: report of this point in {summary['dir']}")
        else:
            console.echo(summary["markdown"])
            console.echo(report.where(summary))
        record.metrics["report"] = {k: v for k, v in summary.items() if k != "markdown"}
