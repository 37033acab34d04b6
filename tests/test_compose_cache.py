"""A command line composed before comes from the compose cache: the same config (values,
node types and flags), plain YAML on disk, and a fresh one as soon as a file composition reads
changes. A config runs the same whether polyft's runner or Hydra's run_job runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("POLYFT_COMPOSE_CACHE", raising=False)
    return tmp_path / "xdg" / "polyft" / "compose"


def composed(overrides, dirs=()):
    from polyft.cli.compose import compose

    return compose("train", list(overrides), with_hydra=True, dirs=list(dirs))


def nodes(cfg, path=""):
    """Every node below `cfg`: its class, types, optionality, flags and raw value."""
    out = []
    for k in cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg)):
        node, where = cfg._get_node(k), f"{path}.{k}"
        m = node._metadata
        out.append((where, type(node).__name__, m.ref_type, m.optional, dict(m.flags),
                    *(getattr(m, a, None) for a in ("object_type", "key_type", "element_type"))))
        if isinstance(node, (DictConfig, ListConfig)):
            if not (node._is_missing() or node._is_none() or node._is_interpolation()):
                out += nodes(node, where)
        else:
            out.append((where, repr(node._value())))
    return out


def test_cached_config_is_the_composed_config(cache_dir):
    overrides = ["adapter.r=16", "quant=4bit", "+data.sources={extra: {type: jsonl, path: x.jsonl}}"]
    fresh = composed(overrides)
    entries = list(cache_dir.iterdir())
    assert [e.suffix for e in entries] == [".yaml"]  # one entry, and no pickle
    assert yaml.safe_load(entries[0].read_text())["adapter"]["r"] == 16  # plain YAML, readable by anyone
    again = composed(overrides)
    assert again is not fresh
    assert OmegaConf.to_yaml(again) == OmegaConf.to_yaml(fresh)
    assert OmegaConf.get_type(again.data.sources.extra).__name__ == "SourceConfig"  # typed as composed
    job = [n for n in nodes(fresh) if not n[0].startswith(".hydra")]
    assert [n for n in nodes(again) if not n[0].startswith(".hydra")] == job  # every node as composed
    assert OmegaConf.is_struct(again) and not OmegaConf.is_readonly(again.hydra)
    assert "${now:" in OmegaConf.to_yaml(again.hydra.run)  # the run dir is resolved when the run starts
    composed(["adapter.r=8"])
    assert len(list(cache_dir.glob("*.yaml"))) == 2  # another command line, another entry


def test_a_changed_config_file_is_composed_again(cache_dir, tmp_path):
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    option = conf / "data" / "mine.yaml"
    option.write_text("name: mine\nsources:\n  a: {type: jsonl, path: a.jsonl}\nmax_length: 64\n")
    assert composed(["data=mine"], [conf]).data.max_length == 64
    option.write_text("name: mine\nsources:\n  a: {type: jsonl, path: a.jsonl}\nmax_length: 32\n")
    st = option.stat()
    os.utime(option, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new mtime even on coarse clocks
    assert composed(["data=mine"], [conf]).data.max_length == 32


def test_cache_can_be_turned_off(cache_dir, monkeypatch):
    monkeypatch.setenv("POLYFT_COMPOSE_CACHE", "0")
    composed(["adapter.r=16"])
    assert not cache_dir.exists()


# Runs one config through polyft's runner and one through Hydra's run_job (`runnable` says
# no), each with a task that reports what it sees, then a failing task through each.
RUN_BOTH = """
import json, logging, os, sys
from omegaconf import OmegaConf
from polyft.cli import compose

seen = {}

def task(name, fail=False):
    def run(cfg):
        root = logging.getLogger()
        seen[name] = {"dir": compose.output_dir(), "cwd": os.getcwd(), "env": os.environ.get("POLYFT_T"),
                      "level": root.level, "hydra_level": logging.getLogger("hydra").level,
                      "handlers": [[type(h).__name__, h.stream.name, h.formatter._fmt] for h in root.handlers],
                      "has_hydra": "hydra" in cfg, "yaml": OmegaConf.to_yaml(cfg)}
        if fail:
            raise RuntimeError(f"task of {name} fails")
    return run

runnable = compose.runnable
overrides = ["+hydra.job.env_set.POLYFT_T=set", "hydra.verbose=[polyft.t]"]
for name in ("polyft", "hydra", "polyft-fail", "hydra-fail"):
    compose.runnable = runnable if name.startswith("polyft") else (lambda cfg: False)
    cfg = compose.compose("train", overrides, with_hydra=True, dirs=[])
    try:
        compose.run_job(cfg, task(name, fail=name.endswith("fail")))
    except RuntimeError as exc:
        seen[name + " raised"] = str(exc)
    seen[name + " env after"] = os.environ.get("POLYFT_T")
    seen[name + " verbose"] = logging.getLogger("polyft.t").level
print(json.dumps(seen))
"""


def test_polyft_runner_runs_a_config_as_hydra_does(tmp_path):
    env = {**os.environ, "POLYFT_COMPOSE_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", RUN_BOTH], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    runs = {}
    for name in ("polyft", "hydra"):
        run_dir = tmp_path / seen[name]["dir"]
        assert run_dir.parent.parent == tmp_path / "outputs" / "runs" / "train"  # outputs/runs/<command>/<day>/<time>
        files = {f: (run_dir / ".hydra" / f).read_text().replace(seen[name]["dir"], "RUN_DIR")
                 for f in ("config.yaml", "hydra.yaml", "overrides.yaml")}
        runs[name] = {**seen[name], "dir": None, "files": files}
    assert runs["polyft"] == runs["hydra"]
    assert runs["polyft"]["env"] == "set" and runs["polyft"]["cwd"] == str(tmp_path)
    assert [h[:2] for h in runs["polyft"]["handlers"]] == [["StreamHandler", "<stdout>"]]
    assert not runs["polyft"]["has_hydra"]
    for name in ("polyft-fail", "hydra-fail"):
        assert seen[f"{name} raised"] == f"task of {name} fails"
        assert seen[f"{name} env after"] is None and seen[f"{name} verbose"] == 10  # env restored; DEBUG
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error executing job with overrides")]
    assert len(errors) == 2 and errors[0] == errors[1]
