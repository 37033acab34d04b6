"""Entry point: `polyft COMMAND [overrides]`.

Composes conf/ with Hydra and validates every point of the run (every sweep point
under -m) before Hydra creates a directory, so a user mistake prints one line, exits 2
and writes nothing. Heavy libraries are imported inside the commands, not here.
"""

from __future__ import annotations

import importlib
import itertools
import re
import sys
import time
from pathlib import Path

from polyft import console
from polyft.config import COMMANDS, RootConfig, register_configs, to_container, validate
from polyft.errors import PolyftError

CONF_DIR = Path(__file__).resolve().parent / "conf"
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


def _schema_keys(dotted: str) -> list[str] | None:
    """Allowed keys under a config path such as 'adapter', from the dataclass schemas."""
    import dataclasses

    node = RootConfig
    for part in [p for p in dotted.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory()
                                                              if fields[part].default_factory
                                                              is not dataclasses.MISSING else None):
            return None
        node = type(fields[part].default_factory())
    return [f.name for f in dataclasses.fields(node)]


def explain(exc: BaseException) -> str:
    """Turn a Hydra/OmegaConf composition error into one line naming the key."""
    text = str(exc)
    cause = exc.__cause__
    while cause is not None:  # Hydra wraps the OmegaConf error that names the key
        text += "\n" + str(cause)
        cause = cause.__cause__
    m = re.search(r"Could not find '([^']+)/([^']+)'.*?Available options in '[^']+':(.*?)(Config search path|$)",
                  text, re.S)
    if m:
        group, option, avail = m.group(1), m.group(2), m.group(3).split()
        return f"{group}={option}: no such option; available: {', '.join(avail) or '(none)'}"
    m = re.search(r"Could not find '([^']+)'", text)
    if m:
        return f"{m.group(1)}: no such config group or option"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' not in", text)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _schema_keys(parent)
        if allowed:
            return f"{key}: unknown key; allowed keys under {parent or 'the root'}: {', '.join(allowed)}"
        return f"{key}: not in the config; to add a new entry to a mapping use +{key}=VALUE"
    m = re.search(r"Value '([^']*)' (?:of type '[^']+' )?(?:could not be converted to|is not a valid value for) (\w+)",
                  text)
    k = re.search(r"full_key: (\S+)", text)
    if m and k:
        return f"{k.group(1)}={m.group(1)}: expected {m.group(2).lower()}"
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return first[:400]


def handler_for(cfg):
    """The module (or stage) with `check(cfg)` and `command(cfg, record)` for this run.
    Under an experiment, merge and eval act on all of the experiment's models."""
    if cfg.command in ("merge", "eval") and (cfg.experts or cfg.baselines):
        return importlib.import_module("polyft.run").STAGES[cfg.command]
    return importlib.import_module(HANDLERS[cfg.command])


def compose(command: str, overrides: list[str], with_hydra: bool = False):
    """The config of one run, as Hydra composes it (hydra.* overrides are Hydra's own;
    `with_hydra` keeps the hydra node, with its launcher)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[f"command={command}", *overrides],
                             return_hydra_config=with_hydra)


def check_launcher_point(command: str, point: list[str]) -> None:
    """A sweep point's launcher values (cpus, memory, time, partition...), before any submission."""
    if not any(o.lstrip("+~").startswith(("hydra/launcher", "hydra.launcher", "resources", "plan.fit"))
               for o in point):
        return
    from omegaconf import OmegaConf

    from polyft.launchers import check_launcher

    cfg = compose(command, point, with_hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    check_launcher(launcher, resources=dict(cfg.resources))
    if cfg.plan.fit and "polyft_launchers" in str(launcher.get("_target_")):
        from polyft.plan import fit_resources

        fit_resources(cfg, launcher)  # a point that fits no GPU is refused here, not at submission


def preflight(command: str, args: list[str], files: bool = True) -> None:
    """Compose and validate every run point; raise PolyftError on the first bad one.
    `files=False` (for --cfg/--info, which only print) skips the checks that read files or the hub."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides, flags = split_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    try:
        points = sweep_points(overrides, multirun)
    except (HydraException, OmegaConfBaseException) as exc:
        raise PolyftError(explain(exc)) from None
    configs = []
    for full in points:  # every point's config rules first: a bad sweep value is refused at once
        point = [o for o in full if not o.lstrip("+~").startswith("hydra")]
        try:
            cfg = compose(command, point)
            check_launcher_point(command, full)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise PolyftError(explain(exc)) from None
        validate(cfg)
        configs.append(cfg)
    for cfg in configs:  # then what reads files (models, data) or the hub
        check = getattr(handler_for(cfg), "check", None)
        if check is not None and files:
            check(cfg)


def run_command(cfg) -> None:
    """Hydra's task function: one run directory, one run.json, one command."""
    from hydra.core.hydra_config import HydraConfig

    from polyft.runs import RunRecord

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    handler = handler_for(cfg)
    record = RunRecord(run_dir, cfg.command, to_container(cfg), seed=cfg.seed)
    with console.job(run_dir, cfg, record):
        try:
            validate(cfg)
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

    from polyft.config import validate
    from polyft.plan import USAGE, estimates, table

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    start = time.time()
    overrides, flags = split_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    rows, gpus, first = [], None, None
    try:
        points = sweep_points(overrides, multirun)
        for n, point in enumerate(points):
            point = [o for o in point if not o.lstrip("+~").startswith("hydra")]
            cfg = compose("plan", point)
            validate(cfg)
            label = " ".join(o for o in point if o not in overrides) or str(n)
            rows += [(f"#{n} {label}" if multirun else label, e) for e in estimates(cfg)]
            gpus = list(cfg.plan.gpus)
            first = first or cfg
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise PolyftError(explain(exc)) from None
    e0 = rows[0][1]
    device = "GPU (bf16 compute)" if first.plan.device == "gpu" else "CPU (fp32)"
    print(f"memory per {device} device, batch {e0.batch} x length {e0.seq}; GiB; * = the config's "
          f"activation checkpointing setting (train.gradient_checkpointing)")
    print(table(rows, gpus))
    print(f"polyft: planned {len(points)} point(s) in {time.time() - start:.1f} s, nothing loaded",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; use one of: {', '.join(COMMANDS)}")
    if command == "plan":  # prints, writes nothing: no run directory, no Hydra launcher
        try:
            return plan_command(rest)
        except PolyftError as exc:
            fail(str(exc))
    wants_help = any(a in ("--help", "-h", "--hydra-help") for a in rest)
    if not wants_help:
        console.start(rest)
        try:
            preflight(command, rest, files=not any(a in ("--cfg", "-c", "--info", "-i") for a in rest))
        except PolyftError as exc:
            fail(str(exc))
    import hydra

    console.pause()
    register_configs()
    # Hydra's parser wants its flags before the overrides.
    overrides, flags = split_args(rest)
    sys.argv = [f"polyft-{command}", *flags, f"command={command}", *overrides]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run_command)()
    return sweep_status()


def sweep_status() -> int:
    """1 when sweep points failed under polyft's submitit launchers (each was printed with its log)."""
    launchers = sys.modules.get("polyft.launchers")
    if launchers is None or not launchers.FAILED:
        return 0
    print(f"polyft: {len(launchers.FAILED)} sweep point(s) failed; their logs are named above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
