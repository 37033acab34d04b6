"""Experiment trackers, as `logger=wandb|tensorboard` asks: W&B runs and TensorBoard logs.

One tracked run per trained product, named after it and finished when its training ends (so
an experiment's second expert, or a sweep's next point in the same process, gets a run of its
own), and one per evaluation that scored something, holding its results as a table. The runs
of an experiment share its name as their group; a sweep's runs share the sweep. A run's
config is polyft's composed config (credentials redacted) beside the product it made; the
trainer's own integration adds its TrainingArguments to the same run.

W&B runs offline unless logger.mode (or WANDB_MODE) says otherwise: offline, wandb writes
files under <run dir>/wandb/offline-run-*/ and nothing leaves the machine until the user
runs `wandb sync` on them. TensorBoard: one log directory per run, <run dir>/tensorboard/NAME.
wandb, torch and transformers load inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from polyft.runs import redact

TOOLS = ("wandb", "tensorboard")
MODES = ("offline", "online", "disabled")
RESULT_COLUMNS = ("model", "task", "lang", "metric", "filter", "value", "stderr", "n")


@dataclass
class Tracked:
    """What one tracked run is: its name, group, kind (train | eval) and config."""

    name: str
    group: str | None
    job_type: str
    config: dict = field(default_factory=dict)


def group_name(exp_name: str | None, command: str, sweep: dict | None) -> str | None:
    """The experiment's name; in a sweep, the sweep (its directory's last two parts, the
    date and time by default); a lone command outside both: no group."""
    if sweep:
        d = Path(sweep["dir"])
        return f"{exp_name or command} sweep {d.parent.name}/{d.name}"
    return exp_name or None


def wandb_mode(logger) -> str:
    return logger.get("mode") or os.environ.get("WANDB_MODE") or "offline"


def _wandb_init(logger, run_dir: Path, tracked: Tracked):
    import wandb

    return wandb.init(project=logger.project, name=tracked.name, group=tracked.group,
                      job_type=tracked.job_type, config=redact(tracked.config), dir=str(run_dir),
                      mode=wandb_mode(logger), reinit="finish_previous",
                      settings=wandb.Settings(silent=True, console="off"))


def _where(logger, run_dir: Path, tracked: Tracked, run=None) -> dict:
    """What run.json records of a tracked run, and what the console says about it."""
    info = {"tool": logger.name, "name": tracked.name, "group": tracked.group, "job_type": tracked.job_type}
    if logger.name == "wandb":
        info.update(mode=wandb_mode(logger), dir=str(Path(run.dir).parent) if run is not None else None,
                    id=run.id if run is not None else None)
        if run is not None and info["mode"] == "online":
            info["url"] = run.url
    else:
        info["dir"] = str(tensorboard_dir(run_dir, tracked.name))
    return info


def tensorboard_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "tensorboard" / name.replace("/", "_")


def _tensorboard_writer(run_dir: Path, tracked: Tracked):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tensorboard_dir(run_dir, tracked.name)))
    writer.add_text("polyft/config", "```\n" + json.dumps(redact(tracked.config), indent=2, default=str) + "\n```")
    return writer


@dataclass
class TrainingHooks:
    """What the trainer needs from the tracker: its `report_to`, callbacks, and at the end
    the summary values to keep with the run (`finish`)."""

    report_to: list = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    info: dict | None = None  # for run.json, once the run exists
    summary: dict = field(default_factory=dict)


@contextlib.contextmanager
def training(logger, run_dir: Path, tracked: Tracked | None, main_process: bool = True):
    """The tracked run of one training, open around it: W&B's run made here (so the trainer's
    integration logs into it, not into a run of its own), finished on the way out (failed if
    the training raised); TensorBoard's writer for this product's own directory."""
    hooks = TrainingHooks()
    if tracked is None or logger.name not in TOOLS or not main_process:
        yield hooks
        return
    if logger.name == "wandb":
        run = _wandb_init(logger, run_dir, tracked)
        hooks.report_to, hooks.info = ["wandb"], _where(logger, run_dir, tracked, run)
        ok = False
        try:
            yield hooks
            ok = True
        finally:
            if ok:
                for k, v in hooks.summary.items():
                    run.summary[k] = v
            run.finish(exit_code=0 if ok else 1)
        return
    from transformers.integrations import TensorBoardCallback

    writer = _tensorboard_writer(run_dir, tracked)
    hooks.callbacks, hooks.info = [TensorBoardCallback(tb_writer=writer)], _where(logger, run_dir, tracked)
    try:
        yield hooks
    finally:
        writer.close()


def log_eval(logger, run_dir: Path, tracked: Tracked, rows: list[dict]) -> dict | None:
    """One tracked run for an evaluation: its rows as a table (`eval/results`), and each
    cell as a summary value `eval/MODEL/TASK/METRIC[,FILTER]` (W&B) or scalar (TensorBoard)."""
    if logger.name not in TOOLS:
        return None

    def key(r) -> str:
        metric = r["metric"] if r["filter"] in (None, "none") else f"{r['metric']},{r['filter']}"
        return f"eval/{r['model']}/{r['task']}/{metric}"

    data = [[r.get(c) for c in RESULT_COLUMNS] for r in rows]
    if logger.name == "wandb":
        import wandb

        run = _wandb_init(logger, run_dir, tracked)
        try:
            run.log({"eval/results": wandb.Table(columns=list(RESULT_COLUMNS), data=data)})
            for r in rows:
                run.summary[key(r)] = r["value"]
            info = _where(logger, run_dir, tracked, run)
        finally:
            run.finish()
        return info
    writer = _tensorboard_writer(run_dir, tracked)
    try:
        for r in rows:
            writer.add_scalar(key(r), r["value"], 0)
        table = ["| " + " | ".join(RESULT_COLUMNS) + " |", "|" + "---|" * len(RESULT_COLUMNS)]
        table += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in data]
        writer.add_text("eval/results", "\n".join(table))
    finally:
        writer.close()
    return _where(logger, run_dir, tracked)


def console_lines(runs: list[dict], run_dir: Path) -> list[str]:
    """Where the tracked runs of a command are, and how to upload or view them."""
    lines = []
    wandb_runs = [r for r in runs if r["tool"] == "wandb"]
    if wandb_runs:
        names = ", ".join(r["name"] for r in wandb_runs)
        mode = wandb_runs[0]["mode"]
        if mode == "offline":
            lines.append(f"polyft: W&B offline runs {names} in {Path(run_dir) / 'wandb'}")
            lines.append(f"polyft: upload them with: wandb sync {Path(run_dir) / 'wandb'}/offline-run-*")
        elif mode == "online":
            lines.append(f"polyft: W&B runs: " + ", ".join(f"{r['name']} {r.get('url') or ''}".strip()
                                                            for r in wandb_runs))
    if any(r["tool"] == "tensorboard" for r in runs):
        lines.append(f"polyft: TensorBoard logs in {Path(run_dir) / 'tensorboard'}; "
                     f"view: tensorboard --logdir {Path(run_dir) / 'tensorboard'}")
    return lines
