"""The real-model experiments (swap_real, maple_real, merge_lowres_real) compose, and every
point of the sweeps the README runs validates, without training anything: `polyft plan`
composes and validates each point, and `polyft run` refuses a bad point before any stage.
The runs themselves take minutes each on 2 cores: `make tables-real`, not the test suite."""

from __future__ import annotations

import re

import pytest

from conftest import assert_user_error, polyft

REAL = ("swap_real", "maple_real", "merge_lowres_real")
# The sweeps of `make tables-real`, as the README runs them.
SWEEPS = {
    "swap_real": ["merge.bottom=3,6,9", "merge.top=3"],
    "maple_real": ["adapter.r=4,64", "quant=none,4bit"],
    "merge_lowres_real": ["merge.slack=0.0,0.1,0.3"],
}


@pytest.fixture
def smol_cli(cli, smollm2_dir):
    """The cli fixture, with the converted SmolLM2 in its outputs/models (skips without it)."""
    return cli


def plan_rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| #")]


@pytest.mark.parametrize("exp", REAL)
def test_real_experiment_composes_on_smollm2(cli, exp):
    proc = cli("run", f"+exp={exp}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^model:\n  name: smollm2-135m$", proc.stdout, re.M), proc.stdout[:400]
    assert "seed: 0" in proc.stdout
    assert not (cli.cwd / "outputs" / "runs").exists()


@pytest.mark.parametrize("exp", REAL)
def test_every_point_of_the_readme_sweep_validates(cli, exp):
    proc = cli("plan", f"+exp={exp}", "-m", *SWEEPS[exp], "plan.device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = plan_rows(proc.stdout)
    points = {r[0] for r in rows}
    n_points = 1
    for axis in SWEEPS[exp]:
        n_points *= len(axis.split("=", 1)[1].split(","))
    assert len(points) == n_points, proc.stdout
    experts = {"swap_real": {"math", "lang"}, "maple_real": {"tuned"},
               "merge_lowres_real": {"math", "ct"}}[exp]
    assert {r[1] for r in rows} == experts
    assert not (cli.cwd / "outputs" / "runs").exists() and not (cli.cwd / "multirun").exists()


def test_maple_grid_trains_what_it_says(cli):
    """The rank axis changes the LoRA's size (30 layers x r x (2*576 + 2*(576+192)) for
    q/k/v/o) and the quant axis the base's bits, at every point."""
    proc = cli("plan", "+exp=maple_real", "-m", "adapter.r=4,64", "quant=none,8bit,4bit", "plan.device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {(r[0].split(" ", 1)[1]): (r[3], r[5]) for r in plan_rows(proc.stdout)}
    assert got["adapter.r=4 quant=none"] == ("460.8K", "32")
    assert got["adapter.r=64 quant=none"] == ("7.37M", "32")
    assert got["adapter.r=64 quant=8bit"] == ("7.37M", "8")
    assert got["adapter.r=4 quant=4bit"] == ("460.8K", "4")


def test_a_swap_deeper_than_the_model_is_refused_before_training(smol_cli):
    """One point of the sweep needs 9 + 20 + 1 + 1 = 31 of SmolLM2's 30 layers: the whole
    sweep is refused up front, nothing trained or written."""
    proc = smol_cli("run", "+exp=swap_real", "-m", "merge.bottom=3,9", "merge.top=0,20")
    assert_user_error(proc, "31 layers", "30")
    assert not (smol_cli.cwd / "outputs" / "runs").exists()
    assert not (smol_cli.cwd / "outputs" / "artifacts").exists()
    assert not (smol_cli.cwd / "multirun").exists()


def test_a_swap_deeper_than_the_tiny_model_is_refused_before_training(cli):
    proc = cli("run", "+exp=demo", "merge.bottom=4", "merge.top=3")
    assert_user_error(proc, "7 layers", "6")
    assert not (cli.cwd / "outputs" / "artifacts").exists()


def test_a_bad_slack_point_is_refused(smol_cli):
    proc = smol_cli("run", "+exp=merge_lowres_real", "-m", "merge.slack=0.1,1.5")
    assert_user_error(proc, "merge.slack=1.5")
    assert not (smol_cli.cwd / "outputs" / "artifacts").exists()


# The powered tables of `make tables-real` (scripts/powered.sh NAME): each sweep as the script runs it.
POWERED = {
    "swap_powered_de": (["seed=0,1,2"], {"math", "lang"}),
    "swap_powered_sw": (["seed=0,1,2"], {"math", "lang"}),
    "transfer_powered": (["seed=0,1,2"], {"en", "fr", "es", "cont", "full_fewshot"}),
    "ties_powered": ([], {"math", "ct"}),
    "maple_powered": (["adapter.r=4,64", "quant=none,4bit"], {"tuned"}),
    "flix_powered": ([], {"flix", "shared"}),
}


@pytest.mark.parametrize("exp", sorted(POWERED))
def test_every_point_of_a_powered_table_validates(cli, exp):
    sweep, experts = POWERED[exp]
    proc = cli("plan", f"+exp={exp}", *(["-m", *sweep] if sweep else []), "plan.device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = plan_rows(proc.stdout) or [[c.strip() for c in line.strip("|").split("|")]
                                      for line in proc.stdout.splitlines() if line.startswith("| 0 ")]
    n_points = 1
    for axis in sweep:
        n_points *= len(axis.split("=", 1)[1].split(","))
    assert len({r[0] for r in rows}) == n_points, proc.stdout
    assert {r[1] for r in rows} == experts
    assert not (cli.cwd / "outputs" / "runs").exists() and not (cli.cwd / "multirun").exists()


def test_powered_script_has_lanes_for_every_table_of_make_tables_real():
    from conftest import REPO

    script = (REPO / "scripts" / "powered.sh").read_text()
    make = (REPO / "Makefile").read_text()
    tables = re.search(r"^TABLES \?= (.*)$", make, re.M).group(1).split()
    assert sorted(tables) == sorted(POWERED)
    for name in tables:
        assert (REPO / "scripts" / "powered" / f"{name}.yaml").is_file(), name
        case = re.sub(r"_(de|sw)$", "_*", name)
        assert re.search(rf"^{re.escape(case)}\)", script, re.M), name


def test_lorahub_shots_follow_the_seed_through_an_interpolated_data_config():
    """transfer_powered's shots: merge.data is ${data}, whose seed is ${seed}; the LoraHub
    search must read the seed's 16 shots, the same rows the few-shot arms train on."""
    from polyft.cli.compose import compose
    from polyft.config.experiment import expert_cfg
    from polyft.data.mixture import load_mixture
    from polyft.products import Refs

    shots = {}
    for seed in (1, 2):
        cfg = compose("run", ["+exp=transfer_powered", f"seed={seed}"])
        rows, max_length = Refs(cfg).data(cfg.merge.data)
        assert rows == load_mixture(expert_cfg(cfg, "cont").data, True) and len(rows) == 16
        shots[seed] = rows
    assert shots[1] != shots[2]
