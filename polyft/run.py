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

from polyft.errors import PolyftError


def _available_experiments() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).resolve().parent / "conf" / "exp").glob("*.yaml"))


def check(cfg) -> None:
    """Refuse an experiment that cannot run, before anything is written."""
    from polyft import train

    if not cfg.exp_name:
        raise PolyftError("polyft run needs an experiment: +exp=NAME; available: "
                          + ", ".join(_available_experiments()))
    train.check(cfg)


def command(cfg, record) -> None:
    from polyft import report, train
    from polyft.eval import command as eval_command
    from polyft.experiment import eval_models, merge_cfg, merge_names
    from polyft.merge import command as merge_command

    train.command(cfg, record)
    for name in merge_names(cfg):
        merge_command.command(merge_cfg(cfg, name), record)
    stage = copy.deepcopy(cfg)
    with open_dict(stage):
        stage.eval.models = eval_models(cfg)
    eval_command.command(stage, record)
    record.save()
    rows = report.collect([{**record.as_dict(), "run_dir": str(record.run_dir)}])
    out = Path(record.run_dir) / "report"
    summary = report.write_report(rows, out, cfg.report.metric, cfg.merge.name or cfg.merge.method)
    print(summary["markdown"])
    record.metrics["report"] = {k: v for k, v in summary.items() if k != "markdown"}
