"""Where configs come from, and composing one run's config from them.

The search path is polyft's own conf/ (shipped in the package), then the user's config
directories, in this order:
    --config-dir DIR (-cd DIR)         a directory with group subdirectories (data/, exp/, ...)
    ./conf                             of the working directory, when it has one
    hydra.searchpath=[file://DIR,...]  Hydra's key for it (its pkg:// entries are left to Hydra)
A user's option may not take the name of a shipped one (it would be shadowed, silently).

Composition goes through Hydra's config loader once per run point, with the hydra node, so
that the config that is validated is the config that runs. This is the one module that uses
hydra._internal (pinned hydra-core 1.3.8): the public compose API takes one config directory
only, and running a composed config as Hydra's run mode does needs its callbacks."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from polyft.config.schema import CONF_DIR, RootConfig, SourceConfig
from polyft.errors import PolyftError

GROUPS = ("model", "adapter", "quant", "data", "train", "logger", "merge", "eval", "exp")
_HYDRAS: dict = {}


def user_config_dirs(config_dir: str | None, overrides: list[str], cwd: Path | None = None) -> list[Path]:
    """The user's config directories, checked: each exists, and no option of theirs takes
    the name of a shipped one."""
    dirs = []
    if config_dir is not None:
        d = Path(config_dir).expanduser().resolve()
        if not d.is_dir():
            raise PolyftError(f"--config-dir {config_dir}: no such directory")
        dirs.append(d)
    local = (cwd or Path.cwd()) / "conf"
    if local.is_dir() and local.resolve() != CONF_DIR and local.resolve() not in dirs:
        dirs.append(local.resolve())
    for entry in searchpath_entries(overrides):
        if entry.startswith("pkg://"):
            continue
        d = Path(entry.removeprefix("file://")).expanduser().resolve()
        if not d.is_dir():
            raise PolyftError(f"hydra.searchpath: {entry}: no such directory")
        if d != CONF_DIR and d not in dirs:
            dirs.append(d)
    for d in dirs:
        for group in GROUPS:
            for f in sorted((d / group).glob("*.yaml")):
                if (CONF_DIR / group / f.name).is_file():
                    raise PolyftError(f"{f}: {group}={f.stem} is an option polyft ships; give yours another name")
    return dirs


def command_line(flags: list[str], overrides: list[str]) -> tuple[list[str], list[Path]]:
    """The overrides as they are composed, and the user's config directories, from a command
    line's Hydra flags (--config-dir) and overrides."""
    config_dir = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f in ("--config-dir", "-cd")), None)
    dirs = user_config_dirs(config_dir, overrides)
    return source_overrides(with_dirs(overrides, dirs)), dirs


def with_dirs(overrides: list[str], dirs: list[Path]) -> list[str]:
    """The overrides with the user's directories as `config_dirs` (recorded with the run, and
    where experiments look up an expert's group options); hydra.searchpath keeps only pkg://
    entries, as the file ones are on the search path already."""
    out = []
    for o in overrides:
        if o.lstrip("+~").partition("=")[0] == "hydra.searchpath":
            pkgs = [e for e in searchpath_entries([o]) if e.startswith("pkg://")]
            if pkgs:
                out.append(f"hydra.searchpath=[{','.join(pkgs)}]")
        else:
            out.append(o)
    if dirs:
        quoted = ",".join("'" + str(d).replace("\\", "\\\\").replace("'", "\\'") + "'" for d in dirs)
        out.append(f"config_dirs=[{quoted}]")
    return out


_SOURCE = re.compile(r"^\+{0,2}data\.sources\.([A-Za-z_][\w-]*)=\s*(\{.*)$", re.S)


def source_overrides(overrides: list[str]) -> list[str]:
    """`data.sources.NAME={type: jsonl, path: ...}` (with or without +) adds source NAME, or
    replaces it as a whole. Hydra cannot assign a new mapping to one entry of a mapping of
    dataclasses, but it can merge one into the mapping: so the override becomes three that
    make NAME exist, delete it and add it fresh, and the result is the same either way."""
    out = []
    for o in overrides:
        m = _SOURCE.match(o)
        if not m:
            out.append(o)
            continue
        name, value = m.groups()
        try:
            parsed = OverridesParser.create().parse_override(f"x={value}").value()
        except Exception:  # not a mapping Hydra can read: let Hydra's own message name it
            out.append(o)
            continue
        allowed = list(SourceConfig.__dataclass_fields__)
        unknown = [k for k in parsed if k not in allowed] if isinstance(parsed, dict) else []
        if unknown:
            raise PolyftError(f"data.sources.{name}.{unknown[0]}: unknown key; allowed keys of a source: "
                              f"{', '.join(allowed)}")
        out += [f"+data.sources={{{name}: {{}}}}", f"~data.sources.{name}", f"+data.sources={{{name}: {value}}}"]
    return out


def searchpath_entries(overrides: list[str]) -> list[str]:
    """The entries of a hydra.searchpath=[...] override, as written."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra.searchpath":
            return [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
    return []


def register_configs() -> None:
    store = ConfigStore.instance()
    if "polyft_schema.yaml" not in store.repo:  # once per process: building the node is not free
        store.store(name="polyft_schema", node=RootConfig)


def hydra_app(command: str, dirs: list[Path]):
    """Hydra's application object for this search path (made once per process)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    key = (command, tuple(dirs))
    if key not in _HYDRAS:
        register_configs()
        search_path = create_config_search_path(f"file://{CONF_DIR}")
        for d in dirs:  # after the package's conf, before the schema: where Hydra puts --config-dir
            search_path.prepend("polyft-user", f"file://{d}", anchor=SearchPathQuery(provider="schema"))
        GlobalHydra.instance().clear()
        _HYDRAS[key] = Hydra.create_main_hydra2(task_name=f"polyft-{command}", config_search_path=search_path)
    GlobalHydra.instance().clear()  # one application per process in Hydra: make this one current
    GlobalHydra.instance().initialize(_HYDRAS[key])
    return _HYDRAS[key]


multirun_app = hydra_app


def compose(command: str, overrides: list[str], with_hydra: bool = False, dirs: list[Path] | None = None):
    """The config of one run point as Hydra composes it for running it (hydra.* overrides
    included); `with_hydra` keeps the hydra node (run dir, launcher, callbacks)."""
    dirs = list(dirs) if dirs is not None else user_config_dirs(None, overrides)
    cfg = hydra_app(command, dirs).compose_config("config", [f"command={command}", *overrides],
                                                  run_mode=RunMode.RUN, with_log_configuration=False)
    if not with_hydra:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    return cfg


def run_job(cfg, task_function) -> None:
    """Run one composed point as Hydra's run mode does (run dir, .hydra/, logging, callbacks),
    without composing it again."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job as hydra_run_job
    from hydra.types import HydraContext

    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name="config")
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    ret = hydra_run_job(hydra_context=HydraContext(config_loader=loader, callbacks=callbacks),  # reads no config
                        task_function=task_function, config=cfg, job_dir_key="hydra.run.dir",
                        job_subdir_key=None, configure_logging=True)
    callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
    _ = ret.return_value  # re-raises what the command raised


def hydra_info(command: str, overrides: list[str], flags: list[str], dirs: list[Path]) -> int:
    """--info and --shell-completion: Hydra's own, through hydra.main, with the user's
    directories on its search path."""
    import sys

    import hydra

    register_configs()
    GlobalHydra.instance().clear()
    flags = [f for i, f in enumerate(flags) if f not in ("--config-dir", "-cd")
             and not (i and flags[i - 1] in ("--config-dir", "-cd"))]
    if dirs:
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.searchpath")]
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]")
    sys.argv = [f"polyft-{command}", *flags, f"command={command}", *overrides]  # Hydra's parser: flags first
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(lambda cfg: None)()
    return 0


def searched(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in [CONF_DIR, *dirs])


def schema_keys(dotted: str) -> list[str] | None:
    """Allowed keys under a config path such as 'adapter', from the dataclass schemas."""
    node = RootConfig
    for part in [p for p in dotted.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or fields[part].default_factory is dataclasses.MISSING:
            return None
        value = fields[part].default_factory()
        if not dataclasses.is_dataclass(value):
            return None
        node = type(value)
    return [f.name for f in dataclasses.fields(node)]


def explain(exc: BaseException, dirs: list[Path] | None = None) -> str:
    """Turn a Hydra/OmegaConf composition error into one line naming the key."""
    text = str(exc)
    cause = exc.__cause__
    while cause is not None:  # Hydra wraps the OmegaConf error that names the key
        text += "\n" + str(cause)
        cause = cause.__cause__
    where = f"; searched: {searched(dirs or [])}"
    m = re.search(r"Could not find '([^']+)/([^']+)'.*?Available options in '[^']+':(.*?)(Config search path|$)",
                  text, re.S)
    if m:
        group, option, avail = m.group(1), m.group(2), m.group(3).split()
        return f"{group}={option}: no such option; available: {', '.join(avail) or '(none)'}{where}"
    m = re.search(r"Could not find '([^']+)'", text)
    if m:
        return f"{m.group(1)}: no such config group or option{where}"
    m = re.search(r"Could not (?:override|append to config\.) '?([\w.]+)'?", text) or \
        re.search(r"Key '([^']+)' not in", text)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = schema_keys(parent)
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
