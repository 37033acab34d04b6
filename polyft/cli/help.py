"""`polyft --help` and `polyft COMMAND --help`, generated, never written out by hand.

The usage lists the commands of polyft.commands.COMMANDS (the merge methods from the merge
registry). A command's help lists the config groups and root keys that command reads (its
entry in COMMANDS), each key on one line with its value in the config composed from the
command line as given (so `polyft merge merge=ties --help` shows TIES' defaults, and
`+exp=NAME` the experiment's), and the comment the schema (polyft.config.schema) gives it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

from polyft.commands import COMMANDS
from polyft.config.schema import CONF_DIR, RootConfig, option_names

USAGE = "usage: polyft {command} [+exp=NAME] [group=option ...] [key=value ...] [-m]"
EXP_KEYS = ("exp_name", "experts", "baselines")
HYDRA_FLAGS = """Hydra flags:
  -m, --multirun              sweep: a=1,2 b=x,y runs every point (hydra/launcher=joblib|slurm|submitit_local)
  --cfg job|hydra|all         print the composed config and exit (--resolve: interpolations resolved;
                              -p KEY: one package of it)
  --info                      Hydra's account of the search path and defaults, and exit
  --config-dir DIR, -cd DIR   your own config groups (also ./conf, hydra.searchpath=[file://DIR])"""


def merge_methods() -> list[str]:
    from polyft.merge import registry

    return registry.names()


def usage() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    methods = ", ".join(merge_methods())
    lines = [f"  {c.name:<{width}} {c.help.format(merge_methods=methods)}" for c in COMMANDS.values()]
    return (USAGE.format(command="COMMAND") + "\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`polyft COMMAND --help` lists the config groups and keys that command reads, with their values."
            + "\n`polyft COMMAND --hydra-help` lists the Hydra flags polyft takes.")


# ---------------------------------------------------------------- the schema's comments

def _comments(cls) -> dict[str, str]:
    """field -> what the dataclass's source says of it: the comment on its line
    (`name: type = x  # says`), else the comment lines right above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, block = {}, []
    for line in source.splitlines():
        if re.match(r"^    #", line):
            block.append(line.strip().lstrip("#").strip())
            continue
        m = re.match(r"^    (\w+)\s*:([^#]*)(#\s*(.+))?$", line)
        if m and (m.group(4) or block):
            out[m.group(1)] = (m.group(4) or " ".join(block)).strip()
        block = []
    return out


def _unwrap(hint):
    """Optional[X] -> X; anything else as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _child(cls, key: str):
    """The schema type under `key` of dataclass `cls` (None when not a dataclass field)."""
    if not dataclasses.is_dataclass(cls):
        return None
    hint = typing.get_type_hints(cls).get(key)
    return _unwrap(hint) if hint is not None else None


def _value_type(hint):
    """Dict[str, X] -> X: the type of each entry of a mapping."""
    if typing.get_origin(hint) in (dict, typing.Dict):
        return _unwrap(typing.get_args(hint)[1])
    return None


def fmt(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def key_lines(prefix: str, value, hint) -> list[tuple[str, str, str]]:
    """(key, value, comment) for every leaf under `prefix`: mappings are walked, a list of
    mappings is a line per entry (`key[i]`), other lists and empty mappings are one value."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [(f"{prefix}[{i}]", fmt(v), "") for i, v in enumerate(value)]
    if isinstance(value, dict) and value:
        cls = hint if dataclasses.is_dataclass(hint) else None
        entry = _value_type(hint)
        comments = _comments(cls) if cls else {}
        out = []
        for k, v in value.items():
            sub = _child(cls, k) if cls else entry
            rows = key_lines(f"{prefix}.{k}", v, sub)
            if cls and k in comments and rows and not rows[0][2]:
                rows[0] = (rows[0][0], rows[0][1], comments[k])
            out += rows
        return out
    return [(prefix, fmt(value), "")]


def _root_comment(key: str) -> str:
    return _comments(RootConfig).get(key, "")


# ---------------------------------------------------------------- a command's help

def command_help(command: str, overrides: list[str], dirs: list[Path]) -> str:
    """The command's groups and keys, valued as `overrides` compose them."""
    from omegaconf import OmegaConf

    from polyft.cli.compose import compose, composition_error, explain
    from polyft.errors import PolyftError

    c = COMMANDS[command]
    try:
        cfg = compose(command, overrides, with_hydra=True, dirs=dirs)
    except Exception as exc:
        if not composition_error(exc):
            raise
        raise PolyftError(explain(exc, dirs)) from None
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    values = OmegaConf.to_container(cfg, resolve=False)
    hints = typing.get_type_hints(RootConfig)
    blocks = []
    for group in c.groups:
        options = option_names(group, dirs)
        if group == "exp":
            chosen = choices.get("exp") or "(none)"
            head = f"exp={chosen}   experiments (+exp=NAME): {', '.join(options)}"
            rows = [r for k in EXP_KEYS for r in key_lines(k, values.get(k), hints.get(k))]
        else:
            head = (f"{group}={choices.get(group)}   options: {', '.join(options)}" if options
                    else f"{group}   (keys only)")
            rows = key_lines(group, values.get(group), _unwrap(hints.get(group)))
        blocks.append(head + "\n" + _table(rows))
    root = [(k, fmt(values.get(k)), _root_comment(k)) for k in c.keys]
    searched = ", ".join(str(d) for d in [CONF_DIR, *dirs])
    details = f"{c.details}\n\n" if c.details else ""
    return (f"{USAGE.format(command=command)}\n\n{c.help.format(merge_methods=', '.join(merge_methods()))}\n\n"
            f"{details}What `polyft {command}` reads, with the values the command line above gives "
            f"(group=option picks an option, key=value sets a key; searched: {searched}):\n\n"
            + "\n\n".join(blocks) + "\n\nrun-level keys\n" + _table(root) + "\n\n" + HYDRA_FLAGS)


def _table(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return "  (none)"
    width = min(max(len(f"{k}={v}") for k, v, _ in rows), 44)
    return "\n".join((f"  {f'{k}={v}':<{width}}   # {note}" if note else f"  {k}={v}") for k, v, note in rows)
