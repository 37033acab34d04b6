"""Entry point: `polyft COMMAND [overrides]`.

Composes each point of the run once (polyft.cli.compose: polyft's conf/ and the user's
config directories) and checks every point (every sweep point under -m) in two stages
before a directory is made: the pure rules (polyft.config.rules.validate), then the
command's `preflight`, which reads files. A user mistake prints one line, exits 2 and
writes nothing. A single run runs from that config; a sweep goes to Hydra's sweeper and
launcher. The commands are polyft.commands.COMMANDS; heavy libraries load inside them.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from pathlib import Path

from polyft import console
from polyft.cli.help import HYDRA_FLAGS, command_help, usage
from polyft.commands import COMMANDS, module
from polyft.errors import PolyftError

# Hydra flags that take no value / one value; they are not overrides.
_FLAGS0 = {"-m", "--multirun", "--resolve", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
_FLAGS1 = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
           "--experimental-rerun", "--run"}
PREFLIGHT_POINTS = 256


def is_override(arg: str) -> bool:
    """`key=value` whose key is a key of the config (r=8 in `polyft ls lora r=8` is not)."""
    from polyft.config.schema import RootConfig

    key, eq, _ = arg.lstrip("+~").partition("=")
    return bool(eq) and (key.split(".")[0] in RootConfig.__dataclass_fields__ or key.startswith("hydra"))


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


def flag_value(flags: list[str], *names: str) -> str | None:
    return next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f in names), None)


def sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Expand `a=1,2 b=x,y` into its points (capped), as Hydra's basic sweeper would."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.islice(itertools.product(*axes), PREFLIGHT_POINTS)]


def check_launcher(cfg) -> None:
    """A point's launcher values (cpus, memory, time, partition...), before any submission."""
    from omegaconf import OmegaConf

    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    if not isinstance(launcher.get("_target_"), str):  # a cached config's hydra node is untyped
        raise PolyftError(f"hydra.launcher._target_={launcher.get('_target_')} is not allowed; give the "
                          "launcher class's import path, or choose a preset: hydra/launcher=slurm")
    ours = "polyft_launchers" in str(launcher.get("_target_"))
    if not ours and not cfg.resources:
        return
    from polyft.cli.launchers import check_launcher as check_values

    check_values(launcher, resources=dict(cfg.resources))
    if ours and "Slurm" in str(launcher.get("_target_")):
        from polyft.commands.multinode import check_nodes

        check_nodes(job_config(cfg), {**launcher, **cfg.resources}, "hydra.launcher")
    if cfg.plan.fit and ours:
        from polyft.commands.plan import fit_resources

        fit_resources(cfg, launcher)  # a point that fits no GPU is refused here, not at submission


def job_config(cfg):
    """The config without its hydra node: what the command sees (as Hydra's run_job gives it)."""
    from omegaconf import open_dict, read_write

    out = copy.deepcopy(cfg)
    with read_write(out), open_dict(out):
        del out["hydra"]
    return out


def composed_points(command: str, overrides: list[str], dirs: list, multirun: bool) -> list:
    """Every run point composed (with its hydra node) and through the pure rules; the first
    bad one raises PolyftError."""
    from polyft.cli.compose import compose, composition_error, explain
    from polyft.config.rules import validate

    try:
        points = sweep_points(overrides, multirun)
        configs = []
        for point in points:
            cfg = compose(command, point, with_hydra=True, dirs=dirs)
            if COMMANDS[command].makes_run:
                check_launcher(cfg)
            configs.append(cfg)
    except Exception as exc:
        if not composition_error(exc):
            raise
        raise PolyftError(explain(exc, dirs)) from None
    for cfg in configs:
        validate(cfg)
    return configs


def preflight(command: str, configs: list) -> None:
    """Then what reads files (models, data) or the hub, for every point."""
    from polyft.products import check_refs

    for cfg in configs:
        cfg = job_config(cfg)
        check_refs(cfg)
        module(command).preflight(cfg)


def run_command(cfg) -> None:
    """The task function (of polyft.cli.compose.run_job, or of Hydra's launchers): one run
    directory, one run.json, one command."""
    from polyft import tracking
    from polyft.cli.compose import output_dir
    from polyft.config.rules import validate
    from polyft.config.schema import to_container
    from polyft.config.summary import lines
    from polyft.runs import RunRecord

    run_dir = Path(output_dir())
    record = RunRecord(run_dir, cfg.command, to_container(cfg), seed=cfg.seed)
    sweep = sweep_info()
    if sweep:  # the commands group their tracked runs by it, and leave the tables to the sweep's end
        record.extra["sweep"] = sweep
    point = sweep["point"] if sweep else None
    with console.job(run_dir, cfg, record, point, lines(cfg, point)):
        try:
            validate(cfg)  # again for each point a launcher composed; cheap and pure
            module(cfg.command).command(cfg, record)
        except PolyftError as exc:
            record.finish("failed", str(exc))
            fail(str(exc))
        except BaseException as exc:
            record.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        record.finish("ok")
        for line in tracking.console_lines(record.extra.get("tracking", []), run_dir):
            console.echo(line)


def sweep_info() -> dict | None:
    """{"dir": the sweep's directory, "point": `#N overrides`} of a sweep point (None outside a sweep)."""
    if "hydra.core.hydra_config" not in sys.modules:
        return None  # Hydra not even imported: a single run by polyft's runner
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    h = HydraConfig.get()
    task = [o for o in h.overrides.task if not o.startswith("command=")]
    return {"dir": str(Path(h.sweep.dir).resolve()), "point": f"#{h.job.num} {' '.join(task)}".strip()}


def print_config(cfg, flags: list[str]) -> None:
    """--cfg job|hydra|all [--resolve] [-p KEY], as Hydra prints them."""
    from omegaconf import OmegaConf

    which = flag_value(flags, "--cfg", "-c") or "job"
    if which not in ("job", "hydra", "all"):
        raise PolyftError(f"--cfg {which}: use job, hydra or all")
    node = OmegaConf.create({"hydra": cfg.hydra}) if which == "hydra" else job_config(cfg) if which == "job" else cfg
    package = flag_value(flags, "--package", "-p")
    if package:
        node = OmegaConf.select(node, package)
        if node is None:
            raise PolyftError(f"--package {package}: no such key in the composed config")
    print(OmegaConf.to_yaml(node, resolve="--resolve" in flags) if OmegaConf.is_config(node) else node, end="")


def point_header(n: int, swept: str, cfg) -> str:
    """`# sweep point N: a=1 b=x`, and the LoRA alpha a point trains with when it follows the rank."""
    a = cfg.adapter
    if a.type == "lora" and a.alpha_ratio is not None:  # the alpha used is not a key of its own
        swept += f"  (LoRA alpha = alpha_ratio {a.alpha_ratio:g} x r {a.r} = {a.alpha_ratio * a.r:g})"
    return f"# sweep point {n}: {swept or '(no swept value)'}"


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
        print(usage())
        return 0
    if args[0] == "--hydra-help":
        print(HYDRA_FLAGS)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; use one of: {', '.join(COMMANDS)}")
    overrides, flags = split_args(rest)
    words = [o for o in overrides if not is_override(o)] if command == "ls" else []  # ls's filters
    overrides = [o for o in overrides if o not in words]
    try:
        from polyft.cli.compose import command_line

        overrides, dirs = command_line(flags, overrides)
        if {"--help", "-h"} & set(flags):
            print(command_help(command, overrides, dirs))
            return 0
        if "--hydra-help" in flags:
            print(HYDRA_FLAGS)
            return 0
        multirun = "-m" in flags or "--multirun" in flags
        printing = {"--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"} & set(flags)
        if command == "ls" and not printing:
            return list_products(overrides, dirs, words)
        if not COMMANDS[command].makes_run or printing:
            return print_only(command, overrides, flags, dirs, multirun)
        console.start(rest)
        configs = composed_points(command, overrides, dirs, multirun)
        preflight(command, configs)
    except PolyftError as exc:
        fail(str(exc))
    from polyft.cli.compose import hydra_app, run_job

    if not multirun:
        run_job(configs[0], run_command)  # the run's own console window (console.job) takes over
        return 0
    console.pause()  # the launcher's jobs open their own windows
    hydra_app(command, dirs).multirun(config_name="config", task_function=run_command,
                                      overrides=[f"command={command}", *overrides, "hydra.mode=MULTIRUN"])
    return sweep_status()


def list_products(overrides: list[str], dirs: list, words: list[str]) -> int:
    """polyft ls: the config only for output_root (and an experiment's, if named)."""
    from polyft.commands.ls import show

    return show(job_config(composed_points("ls", overrides, dirs, False)[0]), words)


def print_only(command: str, overrides: list[str], flags: list[str], dirs: list, multirun: bool) -> int:
    """plan (its table), --cfg and --info: composed and checked, printed, nothing written."""
    start = time.time()
    if {"--info", "-i", "--shell-completion", "-sc"} & set(flags):
        from polyft.cli.compose import hydra_info

        return hydra_info(command, overrides, flags, dirs)
    configs = composed_points(command, overrides, dirs, multirun)
    if command == "plan":
        from omegaconf import OmegaConf

        from polyft.commands.plan import show

        show([(" ".join(o for o in p if o not in overrides), job_config(c),  # the launcher: nodes, GPUs
               OmegaConf.to_container(c.hydra.launcher) if c.hydra.get("launcher") else None)
              for p, c in zip(sweep_points(overrides, multirun), configs)], multirun)
        print(f"polyft: planned {len(configs)} point(s) in {time.time() - start:.1f} s, nothing loaded",
              file=sys.stderr)
        return 0
    if not multirun:
        print_config(configs[0], flags)
        return 0
    for n, (point, cfg) in enumerate(zip(sweep_points(overrides, True), configs)):
        print(point_header(n, " ".join(o for o in point if o not in overrides), cfg))
        print_config(cfg, flags)
        print()
    return 0


def sweep_status() -> int:
    """1 when sweep points failed under polyft's submitit launchers (each was printed with its log)."""
    launchers = sys.modules.get("polyft.cli.launchers")
    if launchers is None or not launchers.FAILED:
        return 0
    print(f"polyft: {len(launchers.FAILED)} sweep point(s) failed; their logs are named above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
