"""Configs of one's own: a project directory with conf/data and conf/exp outside the package,
found through --config-dir, hydra.searchpath or ./conf, with the same validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_user_error

ROWS = [{"prompt": f"What is {a} plus {b}?", "response": str(a + b), "lang": "en"} for a in range(6) for b in range(4)]


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project: rows, a data mixture and two experiments (one with experts)."""
    root = tmp_path / "myproject"
    (root / "conf" / "data").mkdir(parents=True)
    (root / "conf" / "exp").mkdir()
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "conf" / "data" / "my_sums.yaml").write_text(
        f"name: my_sums\nsources:\n  sums:\n    type: jsonl\n    path: {root / 'sums.jsonl'}\n"
        "    features: {task: math}\nmax_length: 64\n")
    (root / "conf" / "exp" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: my_sums\nexp_name: my_exp\n"
        "train:\n  max_steps: 2\n  batch_size: 4\n  save_steps: 100\nlogger:\n  name: none\n")
    (root / "conf" / "exp" / "my_experts.yaml").write_text(
        "# @package _global_\nexp_name: my_experts\nexperts:\n  sums: {data: my_sums}\n  demo: {data: demo_math}\n")
    return root


def run_json(cwd: Path) -> dict:
    records = sorted((cwd / "outputs").rglob("run.json"), key=lambda f: f.stat().st_mtime)
    return json.loads(records[-1].read_text())


def test_project_runs_with_config_dir_searchpath_and_multirun(cli, project):
    conf = project / "conf"
    first = cli("train", "--config-dir", str(conf), "+exp=my_exp")
    assert first.returncode == 0, first.stderr[-3000:]
    rec = run_json(cli.cwd)
    assert rec["status"] == "ok" and rec["config"]["data"]["name"] == "my_sums"
    assert rec["config"]["config_dirs"] == [str(conf)]
    assert rec["config"]["data"]["sources"]["sums"]["weight"] == 1.0  # typed: the schema's defaults
    product = rec["artifacts"][0]["path"]

    # The same config through Hydra's own key: the same product, found in the store.
    again = cli("train", f"hydra.searchpath=[file://{conf}]", "+exp=my_exp")
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_json(cli.cwd)["artifacts"][0] == {**run_json(cli.cwd)["artifacts"][0], "path": product,
                                                  "reused": True}

    # Under -m, every point composed by Hydra's launcher sees the user's options too.
    sweep = cli("train", "-m", "--config-dir", str(conf), "+exp=my_exp", "data.max_length=64,48")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    points = [json.loads(f.read_text()) for f in (cli.cwd / "outputs" / "multirun").rglob("run.json")]
    assert sorted(p["config"]["data"]["max_length"] for p in points) == [48, 64]
    assert all(p["status"] == "ok" and p["config"]["data"]["name"] == "my_sums" for p in points)


def test_conf_in_working_directory_is_searched(project):
    from conftest import polyft

    proc = polyft("train", "data=my_sums", "--cfg", "job", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "name: my_sums" in proc.stdout and str(project / "sums.jsonl") in proc.stdout


def test_experts_name_the_users_options(cli, project):
    """An expert's `data: NAME` is looked up in the user's directories as well (plan loads nothing)."""
    proc = cli("plan", "--config-dir", str(project / "conf"), "+exp=my_experts")
    assert proc.returncode == 0, proc.stderr
    assert "sums" in proc.stdout and "demo" in proc.stdout


def test_missing_option_names_the_searched_dirs(cli, project):
    conf = project / "conf"
    proc = cli("train", "--config-dir", str(conf), "data=my_sumz")
    assert_user_error(proc, "data=my_sumz: no such option", "my_sums", "demo_math", "searched:", str(conf))
    proc = cli("run", f"hydra.searchpath=[file://{conf}]", "+exp=nope")
    assert_user_error(proc, "exp=nope", "my_exp", str(conf))
    assert not (cli.cwd / "outputs" / "runs").exists()


def test_bad_user_dirs_and_shadowing_are_refused(cli, project):
    assert_user_error(cli("train", "--config-dir", str(project / "nowhere")), "--config-dir", "no such directory")
    assert_user_error(cli("train", "hydra.searchpath=[file:///no/such/dir]"), "hydra.searchpath", "no such directory")
    (project / "conf" / "data" / "demo.yaml").write_text("name: demo\n")
    assert_user_error(cli("train", "--config-dir", str(project / "conf")), "data=demo", "ships", "demo.yaml")
    assert not (cli.cwd / "outputs" / "runs").exists()


def test_a_source_is_added_or_replaced_from_the_command_line(cli, project):
    rows = project / "sums.jsonl"
    proc = cli("train", f"+data.sources.extra={{type: jsonl, path: {rows}, weight: 2}}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "extra:" in proc.stdout and "weight: 2.0" in proc.stdout and "math:" in proc.stdout
    # Replaced as a whole: none of the synthetic source's keys (generator, n) stay behind.
    proc = cli("train", f"data.sources.math={{type: jsonl, path: {rows}}}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    math = yaml.safe_load(proc.stdout)["data"]["sources"]["math"]
    assert (math["type"], math["path"], math["generator"], math["n"], math["langs"]) == ("jsonl", str(rows), None, 0, [])
    assert_user_error(cli("train", f"+data.sources.extra={{type: jsonl, pth: {rows}}}"),
                      "data.sources.extra.pth: unknown key", "path")
    assert_user_error(cli("train", f"+data.sources.extra={{type: jsonl, path: {rows}, weight: lots}}"),
                      "data.sources.extra.weight=lots", "expected float")
    assert_user_error(cli("train", "+data.sources.extra={type: jsonl, path: missing.jsonl}"),
                      "data.sources.extra.path=missing.jsonl", "no such file")
    assert not (cli.cwd / "outputs" / "runs").exists()
