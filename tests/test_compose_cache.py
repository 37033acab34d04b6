"""A command line composed before comes from the compose cache: the same config, and a fresh
one as soon as a file composition reads changes."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("POLYFT_COMPOSE_CACHE", raising=False)
    return tmp_path / "xdg" / "polyft" / "compose"


def composed(overrides, dirs=()):
    from polyft.cli.compose import compose

    return compose("train", list(overrides), with_hydra=True, dirs=list(dirs))


def test_cached_config_is_the_composed_config(cache_dir):
    overrides = ["adapter.r=16", "quant=4bit", "+data.sources={extra: {type: jsonl, path: x.jsonl}}"]
    fresh = composed(overrides)
    assert len(list(cache_dir.glob("*.pkl"))) == 1
    again = composed(overrides)
    assert OmegaConf.to_yaml(again) == OmegaConf.to_yaml(fresh)
    assert OmegaConf.get_type(again.data.sources.extra).__name__ == "SourceConfig"  # typed as composed
    assert "${now:" in OmegaConf.to_yaml(again.hydra.run)  # the run dir is resolved when the run starts
    composed(["adapter.r=8"])
    assert len(list(cache_dir.glob("*.pkl"))) == 2  # another command line, another entry


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
