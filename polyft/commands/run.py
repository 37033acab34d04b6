"""`polyft run +exp=NAME`: an experiment's stages in order, each skipped when its product exists.

1. train every expert the experiment names;
2. make its merges (the main `merge`, then each of `baselines`);
3. evaluate base, each expert and each merge on the experiment's suite;
4. print the report table for this run (a sweep also gets one over all its points).
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import open_dict

from polyft import console
from polyft.errors import PolyftError


def check(cfg) -> None:
    """Refuse an experiment that cannot run, before anything is written."""
    from polyft.commands import train
    from polyft.config.schema import option_names

    if not cfg.exp_name:
        raise PolyftError("polyft run needs an experiment: +exp=NAME; available: "
                          + ", ".join(option_names("exp", cfg.config_dirs)))
    train.check(cfg)


def _eval_stage_cfg(cfg):
    from polyft.config.experiment import eval_models

    stage = copy.deepcopy(cfg)
    with open_dict(stage):
        stage.eval.models = eval_models(cfg)
    return stage


class MergeStage:
    """`polyft merge +exp=X`: every merge of the experiment (main, then baselines)."""

    @staticmethod
    def check(cfg) -> None:
        from polyft.config.experiment import merge_cfg, merge_names
        from polyft.commands import merge as merge_command

        for name in merge_names(cfg):
            merge_command.check(merge_cfg(cfg, name))

    @staticmethod
    def command(cfg, record) -> None:
        from polyft.config.experiment import merge_cfg, merge_names
        from polyft.commands import merge as merge_command

        for name in merge_names(cfg):
            merge_command.command(merge_cfg(cfg, name), record)


class EvalStage:
    """`polyft eval +exp=X`: base, every expert and every merge (or eval.models)."""

    @staticmethod
    def check(cfg) -> None:
        from polyft.commands import eval as eval_command

        eval_command.check(_eval_stage_cfg(cfg))

    @staticmethod
    def command(cfg, record, show_rows: bool = True) -> None:
        from polyft.commands import eval as eval_command

        eval_command.command(_eval_stage_cfg(cfg), record, show_rows)


STAGES = {"merge": MergeStage, "eval": EvalStage}


def command(cfg, record) -> None:
    from polyft.commands import report, train

    train.command(cfg, record)
    MergeStage.command(cfg, record)
    EvalStage.command(cfg, record, show_rows=False)  # the report table follows
    record.save()
    rows = report.collect([{**record.as_dict(), "run_dir": str(record.run_dir)}])
    out = Path(record.run_dir) / "report"
    summary = report.write_report(rows, out, cfg.report.metric, cfg.merge.name or cfg.merge.method,
                                  report._groups(cfg))
    console.echo(summary["markdown"])
    record.metrics["report"] = {k: v for k, v in summary.items() if k != "markdown"}
