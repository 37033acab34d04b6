"""Where configs come from, and composing one run's config from them.

The search path is polyft's own conf/ (shipped in the package), then the user's config
directories, in this order:
    --config-dir DIR (-cd DIR)         a directory with group subdirectories (data/, exp/, ...)
    ./conf                             of the working directory, when it has one
    hydra.searchpath=[file://DIR,...]  Hydra's key for it (its pkg:// entries are left to Hydra)
A user's option may not take the name of a shipped one (it would be shadowed, silently).

Composition goes through Hydra's config loader once per run point, with the hydra node, so
that the config that is validated is the config that runs; a command line composed before
against the same files is read back from polyft.cli.cache instead. This is the one module
that uses hydra._internal (pinned hydra-core 1.3.8): the public compose API takes one config
directory only, and running a composed config as Hydra's run mode does needs its callbacks.

Hydra is imported only where it is used: a single run whose config comes from the cache runs
through `run_job`'s own copy of Hydra's run mode and never imports it (its import alone is
0.1-0.3 s of a command that may take a second)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import logging.config
import os
import re
import sys
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from polyft.config.schema import CONF_DIR, RootConfig, SourceConfig
from polyft.errors import PolyftError

# polyft's hydra/launcher/submitit_local.yaml has the name of hydra-submitit-launcher's own
# structured config, so Hydra validates it against that schema (all its keys are the schema's)
# and warns that matching by name is deprecated; the match is wanted, the warning is noise.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against ConfigStore",
                        category=UserWarning)

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
        from hydra.core.override_parser.overrides_parser import OverridesParser

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
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if "polyft_schema.yaml" not in store.repo:  # once per process: building the node is not free
        store.store(name="polyft_schema", node=RootConfig)


def hydra_app(command: str, dirs: list[Path]):
    """Hydra's application object for this search path (made once per process)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

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


def compose(command: str, overrides: list[str], with_hydra: bool = False, dirs: list[Path] | None = None):
    """The config of one run point as Hydra composes it for running it (hydra.* overrides
    included); `with_hydra` keeps the hydra node (run dir, launcher, callbacks). From the
    compose cache when the same command line was composed before against the same files."""
    from polyft.cli import cache

    dirs = list(dirs) if dirs is not None else user_config_dirs(None, overrides)
    full = [f"command={command}", *overrides]
    key = cache.key(command, full, dirs)
    cfg = cache.load(key)
    if cfg is None:
        from hydra.types import RunMode

        cfg = hydra_app(command, dirs).compose_config("config", full, run_mode=RunMode.RUN,
                                                      with_log_configuration=False)
        if runnable(cfg):
            cache.store(key, cfg)
    else:
        _resolvers()  # ${now:...} resolves (--cfg --resolve) without Hydra having registered it
    if not with_hydra:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    return cfg


def composition_error(exc: BaseException) -> bool:
    """A user's mistake found while composing (a Hydra error can only be raised once Hydra is
    imported)."""
    if isinstance(exc, (OmegaConfBaseException, ValueError)):
        return True
    errors = sys.modules.get("hydra.errors")
    return errors is not None and isinstance(exc, errors.HydraException)


# ------------------------------------------------------------------------ running one point

# What polyft's runner reproduces of Hydra's run mode. A config that asks for more (its own
# callbacks, a job that changes directory, logging with custom factories or classes, the
# ${hydra:...} resolver) runs through Hydra's run_job, and is never cached.
SHIPPED_CALLBACKS = {"sweep_report": {"_target_": "polyft.cli.callbacks.SweepReport"}}
_LOGGING_EXT = ("ext://sys.stdout", "ext://sys.stderr")
_RUN: list = []  # the hydra node of the run polyft's runner is in (output_dir() reads it)


def runnable(cfg) -> bool:
    """Whether `run_job` can run `cfg` itself, without Hydra, exactly as Hydra would."""
    h = cfg.hydra
    try:
        callbacks = OmegaConf.to_container(h.callbacks, resolve=False) if h.callbacks is not None else {}
        if callbacks not in ({}, SHIPPED_CALLBACKS) or h.job.chdir is not False:
            return False
        if h.job_logging is not None and not _plain_logging(OmegaConf.to_container(h.job_logging, resolve=False)):
            return False
        return not _uses_hydra_resolver(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    except OmegaConfBaseException:
        return False


def _plain_logging(conf) -> bool:
    """A dictConfig of standard-library classes only: Hydra's configurator (which vets
    factories and classes) does nothing more for it than logging.config does."""
    if logging.config.dictConfigClass is not logging.config.DictConfigurator:
        return False

    def plain(node) -> bool:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "()" or (k == "class" and not (isinstance(v, str) and v.startswith("logging."))):
                    return False
                if not plain(v):
                    return False
            return True
        if isinstance(node, list):
            return all(plain(v) for v in node)
        return not (isinstance(node, str) and (node.startswith(("ext://", "cfg://")) and node not in _LOGGING_EXT))

    return isinstance(conf, dict) and plain(conf)


def _uses_hydra_resolver(node) -> bool:
    if isinstance(node, dict):
        return any(_uses_hydra_resolver(v) for v in node.values())
    if isinstance(node, list):
        return any(_uses_hydra_resolver(v) for v in node)
    return isinstance(node, str) and "${hydra:" in node.replace(" ", "")


def output_dir() -> str:
    """The running job's directory (polyft's runner, or a Hydra job: a launcher's sweep point)."""
    if _RUN:
        return _RUN[-1].runtime.output_dir
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def run_job(cfg, task_function) -> None:
    """Run one composed point as Hydra's run mode does (run dir, .hydra/, logging, callbacks),
    without composing it again: by polyft's runner when it can, else through Hydra."""
    if runnable(cfg):
        return _run_job(cfg, task_function)
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job as hydra_run_job
    from hydra.types import HydraContext, RunMode

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


def _run_job(cfg, task_function) -> None:
    """hydra.core.utils.run_job (1.3.8) step by step, for a `runnable` config: the same run
    directory, .hydra/config.yaml, hydra.yaml and overrides.yaml, job logging, env_set and
    error line. Its callbacks are polyft's SweepReport only, which acts at a sweep's end: a
    single run calls none of its hooks that do anything, so it is not made."""
    _resolvers()
    with read_write(cfg.hydra):
        cfg.hydra.mode = "RUN"  # RunMode.RUN in a typed hydra node; the same YAML either way
    out = str(OmegaConf.select(cfg, "hydra.run.dir"))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(out)
    OmegaConf.set_readonly(cfg.hydra, True)  # as HydraConfig.set_config leaves it
    masked = OmegaConf.masked_copy(cfg, "hydra")  # HydraConfig's copy, and Hydra's deepcopy of it
    masked.hydra._set_parent(cfg)
    hydra_cfg = copy.deepcopy(masked)
    overrides = OmegaConf.to_container(cfg.hydra.overrides.task)
    Path(out).mkdir(parents=True, exist_ok=True)
    _configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
    saved = cfg.hydra.overrides.task if cfg.hydra.output_subdir is not None else None
    where = Path(cfg.hydra.runtime.output_dir) / Path(cfg.hydra.output_subdir or ".")
    # Hydra gives the task a deep copy without the hydra node; this config is the caller's
    # to give away, so the node is taken off instead (the copy is 20 ms of a command's start).
    task_cfg = cfg
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    if saved is not None:
        where.mkdir(parents=True, exist_ok=True)
        for node, name in ((task_cfg, "config.yaml"), (hydra_cfg, "hydra.yaml"), (saved, "overrides.yaml")):
            (where / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")
    _RUN.append(hydra_cfg.hydra)
    failed = None
    try:
        with _env_override(hydra_cfg.hydra.job.env_set):
            try:
                task_function(task_cfg)
            except Exception as exc:  # Hydra keeps it for after its job-end callbacks
                failed = exc
        for ref in logging._handlerList:  # Hydra's _flush_loggers
            with suppress(Exception):
                ref().flush()
    finally:
        _RUN.pop()
    if failed is not None:
        sys.stderr.write(f"Error executing job with overrides: {overrides}" + os.linesep)
        raise failed


def _resolvers() -> None:
    """The resolvers Hydra registers when it starts (hydra.core.utils.setup_globals), but for
    `hydra`, which a runnable config does not use."""
    from datetime import datetime

    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern), use_cache=True)
    if not OmegaConf.has_resolver("python_version"):
        vi = sys.version_info
        versions = {"major": f"{vi[0]}", "minor": f"{vi[0]}.{vi[1]}", "micro": f"{vi[0]}.{vi[1]}.{vi[2]}"}
        OmegaConf.register_new_resolver("python_version", lambda level="minor": versions.get(level))


def _configure_log(log_config, verbose) -> None:
    """hydra.core.utils.configure_log, for the plain dictConfig `runnable` allows."""
    if log_config is not None:
        conf = OmegaConf.to_container(log_config, resolve=True)
        if conf["root"] is not None:
            logging.config.dictConfig(conf)
    else:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    if isinstance(verbose, bool):
        if verbose:
            logging.getLogger().setLevel(logging.DEBUG)
    else:
        for name in [verbose] if isinstance(verbose, str) else verbose:
            logging.getLogger(name).setLevel(logging.DEBUG)


@contextmanager
def _env_override(env):
    """hydra.core.utils.env_override."""
    original = {k: os.getenv(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in original.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def hydra_info(command: str, overrides: list[str], flags: list[str], dirs: list[Path]) -> int:
    """--info and --shell-completion: Hydra's own, through hydra.main, with the user's
    directories on its search path."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    flags = [f for i, f in enumerate(flags) if f not in ("--config-dir", "-cd")
             and not (i and flags[i - 1] in ("--config-dir", "-cd"))]
    if dirs:
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.searchpath")]
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]")
    for info in {"--info", "-i"} & set(flags):  # its optional value: the word after it, else all
        topic = overrides.pop(0) if overrides and overrides[0] in INFO_TOPICS else "all"
        flags.insert(flags.index(info) + 1, topic)
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
    if k:  # a value of the wrong kind: a list or mapping for text, text for a list, ...
        kinds = ((r"is not a valid bool", "true or false"), (r"Cannot convert '\w+' to string", "text"),
                 (r"is not a ListConfig, list or tuple", "a list ([a, b])"),
                 (r"Cannot assign \w+ to Dict", "a mapping ({k: v})"),
                 (r"Cannot assign \w+ to (?:List|ListConfig)", "a list ([a, b])"))
        want = next((w for pattern, w in kinds if re.search(pattern, text)), None)
        given = re.search(r"Error merging override (\S+?=.*?)\n", text + "\n")
        if want:
            return f"{given.group(1).lstrip('+~') if given else k.group(1)}: expected {want} for {k.group(1)}"
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return first[:400]
