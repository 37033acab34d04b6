"""Every key of every config group is checked before anything runs (property style).

The keys are generated: the fields of the schema dataclasses (polyft.config.schema), the
leaves of every YAML file under conf/ (experiments' experts and baselines included) and
the keys of polyft's SLURM launcher as Hydra composes it. A key added later is covered: it
fails test_every_key_has_a_rule until polyft.config.values (or the launcher's table) says
what it takes. Each key then gets a value of the wrong type and, when its rule has a range
or a list of names, one outside it; each must be refused with one line naming the key.
Most cases run in-process, on the code path of the CLI after composition (Hydra's override
application, the launcher check, polyft.config.rules.validate); a sample of them and the
three cases of issue 22 run through the real CLI: exit 2, one line, nothing written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path

import yaml

from conftest import assert_user_error
from polyft.checks import Custom, Flag, Items, Number, OneOf, Text
from polyft.cli import launchers
from polyft.config import values
from polyft.config.schema import CONF_DIR, RootConfig

PLACEHOLDER = "*"


# ------------------------------------------------------------------ the keys, generated

def schema_keys(cls=RootConfig, prefix: str = "") -> set[str]:
    """Every field of the schema, as a table key (mapping entries as `*`)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) is typing.Union else []
        inner = next((a for a in [kind, *args] if dataclasses.is_dataclass(a)), None)
        if inner is not None:
            out |= schema_keys(inner, key + ".")
            continue
        dict_of = next((a for a in [kind, *args] if typing.get_origin(a) is dict), None)
        if dict_of is not None:
            value = typing.get_args(dict_of)[1]
            if dataclasses.is_dataclass(value):
                out |= schema_keys(value, f"{key}.*.")
                continue
            out.add(key)  # the mapping itself (a wrong type: not a mapping)
            if key not in ("experts", "baselines", "expert_root"):
                out.add(f"{key}.*")
            continue
        out.add(key)
    return out


def _flatten(node, prefix: str, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}{k}.", out)
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for v in node:
            _flatten(v, f"{prefix[:-1]}[].", out)
    else:
        out.add(prefix[:-1])


def table_key(key: str) -> str:
    """An experiment's `experts.NAME.GROUP.KEY` is GROUP.KEY's, `baselines.NAME.KEY` is merge.KEY's."""
    parts = key.split(".")
    if parts[0] == "experts" and len(parts) > 2:
        return values.pattern_of(".".join(parts[2:]))
    if parts[0] == "baselines" and len(parts) > 2:
        return values.pattern_of(".".join(["merge", *parts[2:]]))
    return values.pattern_of(key)


def conf_keys() -> set[str]:
    """Every leaf of the YAML files under conf/ (Hydra's launcher presets: launcher_keys)."""
    out = set()
    for f in sorted(CONF_DIR.rglob("*.yaml")):
        group = f.parent.relative_to(CONF_DIR).as_posix()
        if group.startswith("hydra"):
            continue
        node = yaml.safe_load(f.read_text()) or {}
        node.pop("defaults", None)
        node.pop("hydra", None)
        glob = group in (".", "exp") or "@package _global_" in f.read_text()
        leaves: set[str] = set()
        _flatten(node, "" if glob else f"{group}.", leaves)
        for leaf in leaves:
            parts = leaf.split(".")
            if parts[0] == "experts" and len(parts) == 3:
                continue  # `data: demo_math`: an option's name, looked up by the experiment
            out.add(table_key(leaf))
    return out


def launcher_keys() -> set[str]:
    return {f"hydra.launcher.{k}" for k in composed(["hydra/launcher=slurm"]).hydra.launcher}


_COMPOSED: dict = {}


def composed(overrides: list[str], with_hydra: bool = True):
    from polyft.cli.compose import compose

    key = (tuple(overrides), with_hydra)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose("run", list(overrides), with_hydra=with_hydra, dirs=[])
    return _COMPOSED[key]


def all_keys() -> list[str]:
    from polyft.eval.specs import ENTRY_KEYS

    keys = schema_keys() | conf_keys() | launcher_keys() | {f"eval.tasks[].{k}" for k in ENTRY_KEYS}
    keys |= {f"experts.*.{k}" for k in schema_keys() if k.split(".")[0] in values.GROUPS}
    keys |= {f"baselines.*.{k[len('merge.'):]}" for k in schema_keys() if k.startswith("merge.")}
    return sorted(keys)


def rule(key: str):
    if key.startswith("hydra.launcher."):
        return launchers.LAUNCHER_VALUES.get(key.split(".", 2)[2])
    if key in ("experts", "baselines"):
        return Custom(lambda k, v: None, "structure: each entry's keys are checked")
    if key.count(".") == 0 and key in ("resources", "expert_root"):
        return values.rule_for(key) or Custom(lambda k, v: None, "a mapping")
    return values.rule_for(table_key(key)) or (Custom(lambda k, v: None, "a mapping whose entries have rules")
                                              if values.rule_for(table_key(key) + ".*") else None)


def test_every_key_has_a_rule():
    keys = all_keys()
    missing = [k for k in keys if rule(k) is None]
    assert not missing, f"keys without a rule in polyft.config.values: {missing}"
    free = [k for k in keys if isinstance(rule(k), Text) or (isinstance(rule(k), Items) and isinstance(rule(k).rule, Text))]
    print(f"{len(keys)} keys: {len(keys) - len(free)} with a type and range/choice rule, {len(free)} free text")


# ------------------------------------------------------------------ the cases, generated

def _text(v) -> str:
    """A Python value as an override's value."""
    if isinstance(v, list):
        return "[" + ",".join(_text(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


def outside(r) -> list:
    """Values the rule refuses for their value: out of its range or list."""
    if isinstance(r, Number):
        bad = []
        step = 1 if r.integer else 0.5
        if r.low is not None:
            bad.append(r.low if r.low_open else r.low - step)
        if r.high is not None:
            bad.append(r.high if r.high_open else r.high + step)
        if r.integer:
            bad.append(1.5)
        return bad
    if isinstance(r, OneOf):
        return ["nosuch-name"] if all(isinstance(o, str) for o in r.options()) else [3]
    if isinstance(r, Items):
        inner = outside(r.rule)
        return ([[]] if not r.empty else []) + ([[inner[0]]] if inner else [])
    if isinstance(r, Custom):
        return list(r.refused[1:])
    return []


def wrong_type(key: str, r):
    """A value of the wrong kind for the key, or None when any kind is allowed."""
    if isinstance(r, (Number,)):
        return "abc"
    if isinstance(r, OneOf):
        return ["x"] if all(isinstance(o, str) for o in r.options()) else "abc"
    if isinstance(r, Text):
        return ["x"]
    if isinstance(r, Flag):
        return "maybe"
    if isinstance(r, Items):
        return "abc"
    if isinstance(r, Custom):
        if r.refused:
            return r.refused[0]
        return "abc" if key in _MAPPINGS else None
    return None


_MAPPINGS = {"resources", "experts", "baselines", "eval.gen_kwargs", "adapter.ranks", "merge.features",
             "report.groups", "plan.gres", "data.sources.*.features", "data.sources.*.where"}
# A name for each mapping entry, and the overrides of the config it is set in.
ENTRY = {"data.sources.*": "math", "adapter.ranks.*": "task", "adapter.alpha.*": "task",
         "merge.features.*": "task", "data.sources.*.features.*": "task", "data.sources.*.where.*": "lang",
         "report.groups.*": "seen", "plan.gres.*": "24", "experts.*": "math", "baselines.*": "ties"}
# An experiment of one expert and one baseline: validating an experiment composes each of
# its experts and merges (0.2 s each), so keys under experts.* and baselines.* are sampled.
EXPERIMENT = ["++experts={math: {train: {lr: 0.001}}}", "++baselines={ties: {method: ties, density: 0.5}}"]
BASE = {"adapter.alpha.*": ["adapter=flix"], "adapter.ranks.*": ["adapter=flix"], "experts.": EXPERIMENT,
        "baselines.": EXPERIMENT, "hydra.launcher.": ["hydra/launcher=slurm"]}


def sampled(keys: list[str]) -> list[str]:
    """Every key, but under experts.* and baselines.* the first of each group only."""
    seen, out = set(), []
    for key in keys:
        parts = key.split(".")
        if parts[0] in ("experts", "baselines") and len(parts) > 2:
            group = parts[0] + (parts[2] if parts[0] == "experts" else "")
            if group in seen or isinstance(rule(key), Text):
                continue
            seen.add(group)
        out.append(key)
    return out


def concrete(key: str) -> tuple[list[str], str]:
    """(base overrides, the key as set on the command line and named by the refusal)."""
    base = next((b for p, b in BASE.items() if key.startswith(p)), [])
    parts = key.split(".")
    names = [ENTRY.get(".".join(parts[:i] + ["*"]), "x") if part == "*" else part for i, part in enumerate(parts)]
    return base, ".".join(names)


def cases() -> list[tuple[str, list[str], str, str]]:
    """(key, base overrides, override, the key the refusal must name)."""
    out = []
    for key in sampled(all_keys()):
        r = rule(key)
        if key == "resources.*" or key == "eval.gen_kwargs.*":
            continue  # any value: launcher keys (hydra.launcher.* cases) and lm-eval's generation arguments
        base, set_key = concrete(key)
        if key.startswith("eval.tasks[]."):
            field = key[len("eval.tasks[]."):]
            for v in [wrong_type(key, r), *outside(r)]:
                if v is not None and field != "name":
                    out.append((key, [], f"eval.tasks=[{{name: demo_arith_en, {field}: {_text(v)}}}]",
                                f"eval.tasks[0].{field}"))
            continue
        bad = [wrong_type(key, r), *outside(r)]
        for v in bad:
            if v is None:
                continue
            out.append((key, base, f"++{set_key}={_text(v)}", set_key))
    return out


def refusal(base: list[str], override: str) -> str | None:
    """The one line the CLI would print for `override` over `base` (None: accepted), by the
    CLI's own steps after composition."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from polyft.cli.compose import composition_error, explain
    from polyft.cli.main import check_launcher
    from polyft.config.rules import validate
    from polyft.errors import PolyftError

    launcher = override.lstrip("+").startswith("hydra.")
    cfg = copy.deepcopy(composed(base, with_hydra=launcher))  # the hydra node: 10 ms a copy
    try:
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides([override]), cfg)
        if launcher:
            check_launcher(cfg)
    except Exception as exc:
        if isinstance(exc, PolyftError):
            return str(exc)
        assert composition_error(exc), (override, exc)
        return explain(exc)
    try:
        validate(cfg)
    except PolyftError as exc:
        return str(exc)
    return None


def test_every_key_refuses_a_wrong_type_and_a_value_out_of_range(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = cases()
    keys = {k for k, *_ in found}
    accepted, unnamed = [], []
    for key, base, override, named in found:
        line = refusal(base, override)
        if line is None:
            accepted.append(override)
        elif named not in line or "\n" in line:
            unnamed.append((override, line))
    assert not accepted, f"accepted: {accepted}"
    assert not unnamed, f"refused without naming the key in one line: {unnamed}"
    assert list(tmp_path.iterdir()) == []  # nothing written
    print(f"{len(found)} bad values over {len(keys)} keys, each refused in one line naming its key")


def test_good_values_pass():
    """The other direction: each library name the rules list is accepted (the lists are
    transformers' own), and every shipped experiment validates."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(values.schedulers()) == {s.value for s in SchedulerType}
    assert set(values.optimizers()) == {o.value for o in OptimizerNames}
    for override in [f"train.scheduler={s.value}" for s in SchedulerType] + ["train.optimizer=adafactor",
                                                                               "model.attn_implementation=eager",
                                                                               "logger.mode=disabled"]:
        assert refusal([], override) is None, override


# ------------------------------------------------------------------ through the real CLI

def nothing_written(cwd: Path) -> None:
    assert sorted(p.name for p in (cwd / "outputs").iterdir()) == ["models"]
    assert not (cwd / "multirun").exists()


def test_a_sample_through_the_cli(cli):
    found = cases()
    sample = found[:: max(1, len(found) // 12)]
    for key, base, override, named in sample:
        proc = cli("run", *base, override)
        assert_user_error(proc, named)
        nothing_written(cli.cwd)


def test_the_three_cases_of_issue_22(cli, tiny_llama_dir):
    latin = cli.cwd / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9", "response": "ok", "lang": "fr"}\n'.encode("latin-1"))
    proc = cli("train", "logger=none", "+data.sources.extra={type: jsonl, path: latin.jsonl}")
    assert_user_error(proc, "latin.jsonl", "line 1", "not UTF-8")
    nothing_written(cli.cwd)

    assert_user_error(cli("train", "train.scheduler=nosuch"), "train.scheduler=nosuch", "cosine", "SchedulerType")
    nothing_written(cli.cwd)

    from test_lorahub import _lora

    adapters = [_lora(tiny_llama_dir, cli.cwd / f"lora{i}", seed=i) for i in range(2)]
    shots = cli.cwd / "shots.jsonl"
    shots.write_text(json.dumps({"prompt": "2 + 2?", "response": "4"}) + "\n"
                     + json.dumps({"prompt": 5, "response": ["a", "b"]}) + "\n")
    proc = cli("merge", "merge=lorahub", f"merge.adapters=[{adapters[0]},{adapters[1]}]", f"merge.data={shots}")
    assert_user_error(proc, str(shots), "line 2", "prompt", "a number (5)")
    shots.write_text(json.dumps({"prompt": "2 + 2?", "response": ["a", "b"]}) + "\n")
    proc = cli("merge", "merge=lorahub", f"merge.adapters=[{adapters[0]},{adapters[1]}]", f"merge.data={shots}")
    assert_user_error(proc, str(shots), "line 1", "response", "a list")
    nothing_written(cli.cwd)
