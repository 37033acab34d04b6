"""`polyft run +exp=NAME`: an experiment's stages in order, each skipped when its product exists.

1. train every expert the experiment names;
2. make its merges (the main `merge`, then each of `baselines`);
3. evaluate base, each expert and each merge on the experiment's suite;
4. print the report table for this run (a sweep also gets one over all its points).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import open_dict

from polyft.errors import PolyftError


def _available_experiments() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).resolve().parent / "conf" / "exp").glob("*.yaml"))


def eval_models(cfg) -> list[str]:
    from polyft.experiment import merge_names

    if cfg.eval.models:
        return list(cfg.eval.models)
    return ["base", *cfg.experts, *merge_names(cfg)]


def check(cfg) -> None:
    """Refuse an experiment that cannot run, before anything is written."""
    from polyft import train
    from polyft.experiment import main_merge_name, merge_cfg, merge_names

    if not cfg.exp_name:
        raise PolyftError("polyft run needs an experiment: +exp=NAME; available: "
                          + ", ".join(_available_experiments()))
    train.check(cfg)
    produced = {"base", *cfg.experts}
    for name in merge_names(cfg):
        m = merge_cfg(cfg, name).merge
        refs = [*m.models, m.base, m.middle, m.outer]
        for ref in refs:
            if ref is not None and str(ref) not in produced and not Path(str(ref)).exists():
                key = "merge" if name == main_merge_name(cfg) else f"baselines.{name}"
                raise PolyftError(f"{key} names model '{ref}', which no stage of exp={cfg.exp_name} produces; "
                                  f"known: {', '.join(sorted(produced))}")
        produced.add(name)
    for ref in eval_models(cfg):
        if ref not in produced and not Path(ref).exists():
            raise PolyftError(f"eval.models names '{ref}', which no stage of exp={cfg.exp_name} produces; "
                              f"known: {', '.join(sorted(produced))}")


def command(cfg, record) -> None:
    from polyft import report, train
    from polyft.eval import command as eval_command
    from polyft.experiment import merge_cfg, merge_names
    from polyft.merge import command as merge_command

    train.command(cfg, record)
    for name in merge_names(cfg):
        merge_command.command(merge_cfg(cfg, name), record)
    stage = cfg.copy()
    with open_dict(stage):
        stage.eval.models = eval_models(cfg)
    eval_command.command(stage, record)
    record.save()
    rows = report.collect([{**record.as_dict(), "run_dir": str(record.run_dir)}])
    out = Path(record.run_dir) / "report"
    summary = report.write_report(rows, out, cfg.report.metric, cfg.merge.name or cfg.merge.method)
    print(summary["markdown"])
    record.metrics["report"] = {k: v for k, v in summary.items() if k != "markdown"}
