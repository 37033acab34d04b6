"""Entry point: `polyft COMMAND [overrides]`.

Composes each point of the run once (polyft/compose.py: polyft's conf/ and the user's config
directories) and validates every point (every sweep point under -m) before a directory is
made, so a user mistake prints one line, exits 2 and writes nothing. A single run runs from
that config; a sweep goes to Hydra's sweeper and launcher. Heavy libraries are imported
inside the commands, not here.
"""

from __future__ import annotations

import importlib
import itertools
import sys
import time
from pathlib import Path

from polyft import console
from polyft.errors import PolyftError

HANDLERS = {
    "train": "polyft.train",
    "merge": "polyft.merge.command",
    "eval": "polyft.eval.command",
    "run": "polyft.run",
    "report": "polyft.report",
    "plan": "polyft.plan",
}
USAGE = """usage: polyft COMMAND [+exp=NAME] [group=option ...] [key=value ...] [-m]

commands:
  train    supervised fine-tuning: full, LoRA, QLoRA 4/8-bit, on multilingual mixtures
  merge    merge models: linear, task_arithmetic, ties, ties_sv, dare, slerp, layer_swap
  eval     per-language evaluation through lm-evaluation-harness
  run      an experiment's stages end to end (train, merge, eval, report), cached
  report   paper-style tables and plots from the runs on disk
  plan     per run / sweep point: what it trains and the accelerator memory it needs

`polyft COMMAND --help` lists the config groups and options of a command."""
# Hydra flags that take no value / one value; they are not overrides.
_FLAGS0 = {"-m", "--multirun", "--resolve", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
_FLAGS1 = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
           "--experimental-rerun", "--run"}
PREFLIGHT_POINTS = 256


def fail(message: str) -> None:
    console.stop()
    print(f"polyft: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, Hydra flags with their values) among `args`."""
    overrides, flags, skip = [], [], False
    for a in args:
        if skip:
            flags.append(a)
            skip = False
        elif a in _FLAGS1:
            flags.append(a)
            skip = True
        elif a.startswith("-"):
            flags.append(a)
        else:
            overrides.append(a)
    return overrides, flags


def sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Expand `a=1,2 b=x,y` into its points (capped), as Hydra's basic sweeper would."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        if multirun and o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.islice(itertools.product(*axes), PREFLIGHT_POINTS)]


def handler_for(cfg):
    """The module (or stage) with `check(cfg)` and `command(cfg, record)` for this run.
    Under an experiment, merge and eval act on all of the experiment's models."""
    if cfg.command in ("merge", "eval") and (cfg.experts or cfg.baselines):
        return importlib.import_module("polyft.run").STAGES[cfg.command]
    return importlib.import_module(HANDLERS[cfg.command])


def check_launcher(cfg) -> None:
    """A point's launcher values (cpus, memory, time, partition...), before any submission."""
    from omegaconf import OmegaConf

    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    ours = "polyft_launchers" in str(launcher.get("_target_"))
    if not ours and not cfg.resources:
        return
    from polyft.launchers import check_launcher as check_values

    check_values(launcher, resources=dict(cfg.resources))
    if cfg.plan.fit and ours:
        from polyft.plan import fit_resources

        fit_resources(cfg, launcher)  # a point that fits no GPU is refused here, not at submission


def preflight(command: str, overrides: list[str], dirs: list, multirun: bool, files: bool = True) -> list:
    """Compose and validate every run point (with its hydra node); raise PolyftError on the
    first bad one. `files=False` (for --cfg/--info, which only print) skips the checks that
    read files or the hub. Returns the configs, to run a single point from."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from polyft.compose import compose, explain
    from polyft.experiment import validate_run

    try:
        points = sweep_points(overrides, multirun) if multirun else [overrides]
    except (HydraException, OmegaConfBaseException) as exc:
        raise PolyftError(explain(exc, dirs)) from None
    configs = []
    for point in points:  # every point's config rules first: a bad sweep value is refused at once
        try:
            cfg = compose(command, point, with_hydra=True, dirs=dirs)
            check_launcher(cfg)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise PolyftError(explain(exc, dirs)) from None
        validate_run(cfg)
        configs.append(cfg)
    for cfg in configs:  # then what reads files (models, data) or the hub
        check = getattr(handler_for(cfg), "check", None)
        if check is not None and files:
            check(job_config(cfg))
    return configs


def job_config(cfg):
    """The config without its hydra node: what the command sees (as Hydra's run_job gives it)."""
    import copy

    from omegaconf import open_dict, read_write

    out = copy.deepcopy(cfg)
    with read_write(out), open_dict(out):
        del out["hydra"]
    return out


def run_single(cfg) -> None:
    """Run one composed point as Hydra's run mode does (run dir, .hydra/, logging, callbacks),
    without composing it again."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import read_write

    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name="config")
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    ret = run_job(hydra_context=HydraContext(config_loader=loader, callbacks=callbacks),  # run_job reads no config
                  task_function=run_command, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                  configure_logging=True)
    callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
    _ = ret.return_value  # re-raises what the command raised


def run_command(cfg) -> None:
    """Hydra's task function: one run directory, one run.json, one command."""
    from hydra.core.hydra_config import HydraConfig

    from polyft.config import to_container, validate
    from polyft.runs import RunRecord

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    handler = handler_for(cfg)
    record = RunRecord(run_dir, cfg.command, to_container(cfg), seed=cfg.seed)
    with console.job(run_dir, cfg, record):
        try:
            validate(cfg)  # the experiment's structure was checked by preflight, before any directory
            handler.command(cfg, record)
        except PolyftError as exc:
            record.finish("failed", str(exc))
            fail(str(exc))
        except BaseException as exc:
            record.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        record.finish("ok")


def plan_command(args: list[str]) -> int:
    """`polyft plan ...`: compose each point as the sweep would and print polyft.plan's table
    (here, not in plan.py, because it composes configs as the other commands do)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from polyft.compose import command_line, compose, explain
    from polyft.experiment import validate_run
    from polyft.plan import USAGE, estimates, table

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    start = time.time()
    overrides, flags = split_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    rows, gpus, first = [], None, None
    overrides, dirs = command_line(flags, overrides)
    try:
        points = sweep_points(overrides, multirun)
        for n, point in enumerate(points):
            cfg = compose("plan", point, dirs=dirs)
            validate_run(cfg)
            label = " ".join(o for o in point if o not in overrides) or str(n)
            rows += [(f"#{n} {label}" if multirun else label, e) for e in estimates(cfg)]
            gpus = list(cfg.plan.gpus)
            first = first or cfg
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise PolyftError(explain(exc, dirs)) from None
    e0 = rows[0][1]
    device = "GPU (bf16 compute)" if first.plan.device == "gpu" else "CPU (fp32)"
    print(f"memory per {device} device, batch {e0.batch} x length {e0.seq}; GiB; * = the config's "
          f"activation checkpointing setting (train.gradient_checkpointing)")
    print(table(rows, gpus))
    print(f"polyft: planned {len(points)} point(s) in {time.time() - start:.1f} s, nothing loaded",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(list(sys.argv[1:] if argv is None else argv))
    finally:
        # The process exits next: leave its objects to the OS instead of a last collection
        # over all of them (measured: 0.05 s of every command's exit).
        import gc

        gc.freeze()


def run_cli(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    from polyft.config import COMMANDS

    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; use one of: {', '.join(COMMANDS)}")
    if command == "plan":  # prints, writes nothing: no run directory, no Hydra launcher
        try:
            return plan_command(rest)
        except PolyftError as exc:
            fail(str(exc))
    from polyft.compose import command_line

    overrides, flags = split_args(rest)
    multirun = "-m" in flags or "--multirun" in flags
    helping = bool({"--help", "-h", "--hydra-help"} & set(flags))
    if not helping:
        console.start(rest)
    try:
        overrides, dirs = command_line(flags, overrides)
        printing = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
        if printing & set(flags):
            if multirun and {"--cfg", "-c"} & set(flags) and not helping:
                return show_points(overrides, flags, configs=preflight(command, overrides, dirs, True, files=False))
            if not helping:
                preflight(command, overrides, dirs, multirun=False, files=False)
            return hydra_main(command, overrides, flags, dirs)
        configs = preflight(command, overrides, dirs, multirun)
    except PolyftError as exc:
        fail(str(exc))
    from polyft.compose import hydra_app

    if not multirun:
        run_single(configs[0])  # the run's own console window (console.job) takes over preflight's
        return 0
    console.pause()  # the launcher's jobs open their own windows
    app = hydra_app(command, dirs)  # Hydra's sweeper and launcher compose each point
    app.multirun(config_name="config", task_function=run_command,
                 overrides=[f"command={command}", *overrides, "hydra.mode=MULTIRUN"])
    return sweep_status()


def hydra_main(command: str, overrides: list[str], flags: list[str], dirs: list) -> int:
    """--help, --cfg, --info and the other flags that print: Hydra's own, with the user's
    directories on its search path."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from polyft.compose import CONF_DIR
    from polyft.config import register_configs

    console.pause()
    register_configs()
    GlobalHydra.instance().clear()  # preflight's application; hydra.main makes its own
    flags = [f for i, f in enumerate(flags) if f not in ("--config-dir", "-cd")
             and not (i and flags[i - 1] in ("--config-dir", "-cd"))]
    if dirs:
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.searchpath")]
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]")
    # Hydra's parser wants its flags before the overrides.
    sys.argv = [f"polyft-{command}", *flags, f"command={command}", *overrides]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run_command)()
    return 0


def show_points(overrides: list[str], flags: list[str], configs: list) -> int:
    """`-m ... --cfg job|hydra|all [--resolve] [-p KEY]`: each sweep point's config, headed by its
    swept values (Hydra's own --cfg refuses --multirun, so a sweep's points could not be read)."""
    from omegaconf import OmegaConf

    def value(names):
        return next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f in names), None)

    kind, package = value(("--cfg", "-c")), value(("--package", "-p"))
    if kind not in ("job", "hydra", "all"):
        raise PolyftError(f"--cfg {kind}: use job, hydra or all")
    console.pause()  # the config goes to stdout itself, as Hydra's --cfg does
    for n, (point, cfg) in enumerate(zip(sweep_points(overrides, True), configs)):
        node = job_config(cfg) if kind == "job" else OmegaConf.create({"hydra": cfg.hydra}) if kind == "hydra" else cfg
        if package:
            node = OmegaConf.select(node, package)
        swept = " ".join(o for o in point if o not in overrides) or "(no swept value)"
        a = cfg.adapter
        if a.type == "lora" and a.alpha_ratio is not None:  # the alpha it trains with is not a key of its own
            swept += f"  (LoRA alpha = alpha_ratio {a.alpha_ratio:g} x r {a.r} = {a.alpha_ratio * a.r:g})"
        print(f"# sweep point {n}: {swept}")
        print(OmegaConf.to_yaml(node, resolve="--resolve" in flags) if OmegaConf.is_config(node) else node)
    return 0


def sweep_status() -> int:
    """1 when sweep points failed under polyft's submitit launchers (each was printed with its log)."""
    launchers = sys.modules.get("polyft.launchers")
    if launchers is None or not launchers.FAILED:
        return 0
    print(f"polyft: {len(launchers.FAILED)} sweep point(s) failed; their logs are named above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
