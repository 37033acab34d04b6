"""`polyft --help`, `polyft COMMAND --help` and `--hydra-help`: generated from the registries,
the commands table and the config, each command listing only what it reads (without torch)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from omegaconf import OmegaConf

from test_cli import _run_no_torch

KEY_LINE = re.compile(r"^  ([\w.\[\]]+)=(.*?)(?:\s+# .*)?$")


def keys_of(text: str) -> dict[str, object]:
    """key -> value (read back as YAML) of every `  key=value` line of a help."""
    out = {}
    for line in text.splitlines():
        m = KEY_LINE.match(line)
        if m:
            out[m.group(1)] = yaml.safe_load(m.group(2))
    return out


def expected(schema, option_file) -> dict:
    """The option's YAML over the schema's defaults, as plain values (no Hydra, no polyft)."""
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(option_file)))


def help_of(tmp_path, *args) -> str:
    proc = _run_no_torch(*args, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip().endswith("NO_TORCH")  # help stays as light as it was
    return proc.stdout


@pytest.mark.parametrize("option", ["linear", "ties"])
def test_merge_help_lists_every_merge_key_with_the_options_value(tmp_path, option):
    from polyft.config.schema import CONF_DIR, EvalConfig, MergeConfig

    merge = keys_of(help_of(tmp_path, "merge", f"merge={option}", "--help"))
    want = expected(MergeConfig, CONF_DIR / "merge" / f"{option}.yaml")
    got = {k.removeprefix("merge."): v for k, v in merge.items() if k.startswith("merge.")}
    # dict keys are walked: merge.features={} is one line while empty
    assert got == {k: v for k, v in want.items()}, (set(got) ^ set(want))
    assert not any(k.startswith(("eval.", "train.", "adapter.", "data.")) for k in merge)
    evaluated = keys_of(help_of(tmp_path, "eval", "--help"))
    assert not any(k.startswith("merge.") for k in evaluated)
    assert {k.split(".")[1].split("[")[0] for k in evaluated if k.startswith("eval.")} == \
        {f.name for f in dataclasses.fields(EvalConfig)}


def test_each_command_lists_its_groups_only(tmp_path):
    heads = {}
    for command in ("train", "merge", "eval", "run", "report", "plan"):
        text = help_of(tmp_path, command, "--help")
        heads[command] = {k.split(".")[0].split("[")[0] for k in keys_of(text) if "." in k}
    assert heads["train"] == {"model", "adapter", "quant", "data", "train", "logger"}
    assert heads["merge"] == {"merge", "model"}
    assert heads["eval"] == {"eval", "model", "quant", "logger"}
    assert heads["report"] == {"report"}
    assert heads["run"] == heads["train"] | {"merge", "eval", "report"}
    assert len({frozenset(h) for h in heads.values()}) == 6  # six different helps


def test_help_follows_the_experiment_and_the_command_line(tmp_path):
    from polyft.config.schema import CONF_DIR

    text = help_of(tmp_path, "train", "+exp=demo", "adapter.r=32", "--help")
    keys = keys_of(text)
    assert keys["adapter.r"] == 32
    demo = OmegaConf.load(CONF_DIR / "exp" / "demo.yaml")
    for expert, spec in demo.experts.items():
        assert keys[f"experts.{expert}.train.max_steps"] == spec.train.max_steps
        assert keys[f"experts.{expert}.data"] == spec.data
    assert keys["exp_name"] == "demo"


def test_usage_lists_every_merge_method_and_hydra_help_works(tmp_path):
    from polyft.merge import registry

    usage = help_of(tmp_path, "--help")
    merge_line = next(line for line in usage.splitlines() if line.startswith("  merge "))
    listed = set(re.split(r",\s*", merge_line.split(":", 1)[1].strip()))
    assert listed == set(registry.names()) and {"lorahub", "flix_compose", "dare_linear"} <= listed
    for args in (["--hydra-help"], ["merge", "--hydra-help"], ["run", "+exp=demo", "--hydra-help"]):
        text = help_of(tmp_path, *args)
        assert "--multirun" in text and "--cfg job|hydra|all" in text
    assert "Defaults List" in help_of(tmp_path, "train", "--info")  # a flag the Hydra flags name
    assert "adapter/full" in help_of(tmp_path, "train", "--info", "defaults", "adapter=full")
    assert not (tmp_path / "outputs").exists()


def test_help_with_a_bad_override_is_one_line(tmp_path):
    proc = _run_no_torch("merge", "merge=nope", "--help", cwd=tmp_path)
    assert "merge=nope" in proc.stderr and "ties" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
