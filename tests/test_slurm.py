"""Sweeps on a real one-node SLURM cluster (scripts/slurm_local.sh), through submitit."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error

SCRIPT = REPO / "scripts" / "slurm_local.sh"
FAST_TRAIN = ["logger=none", "train.max_steps=4", "train.save_steps=4", "hydra.launcher.cpus_per_task=1"]
FAST_RUN = ["experts.math.train.max_steps=4", "experts.lang.train.max_steps=4", "eval.limit=2",
            "baselines={}", "hydra.launcher.cpus_per_task=1"]


def slurm(action: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=900)


def daemons() -> list[str]:
    """slurmctld, slurmd and munged processes alive (zombies waiting for init do not count)."""
    out = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True).stdout
    return [l.split()[1] for l in out.splitlines()
            if len(l.split()) == 2 and l.split()[1] in ("slurmctld", "slurmd", "munged") and not l.startswith("Z")]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster, started for the session and stopped at its end (if it started it)."""
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("the local SLURM cluster needs root to install slurm-wlm and munge")
    was_up = slurm("status").returncode == 0
    if not was_up:
        proc = slurm("start")
        assert proc.returncode == 0, proc.stderr[-3000:]
    yield
    if not was_up:
        slurm("stop")


def records(sweep: Path, n: int) -> list[dict]:
    return [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(n)]


def test_train_sweep_on_slurm_with_resources_from_the_plan(cli, slurm_cluster):
    sweep = cli.cwd / "sweep"
    proc = cli("train", "-m", "adapter.r=4,8", "hydra/launcher=slurm", "plan.fit=true", "plan.device=cpu",
               *FAST_TRAIN, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sacct" not in proc.stderr
    recs = records(sweep, 2)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert {r["config"]["adapter"]["r"] for r in recs} == {4, 8}
    products = {r["artifacts"][0]["path"] for r in recs}
    assert len(products) == 2 and all((Path(cli.cwd) / p / "adapter_config.json").is_file() or
                                      Path(p, "adapter_config.json").is_file() for p in products)
    # each point was submitted with the memory its plan asked for
    from polyft.cli.compose import compose
    from polyft.commands.plan import fit_resources

    scripts = sorted(sweep.glob(".submitit/*/*_submission.sh"))
    asked = {re.search(r"--mem=(\d+)GB", s.read_text()).group(1) for s in scripts}
    want = {str(fit_resources(compose("train", [f"adapter.r={r}", "plan.device=cpu"]), {})["mem_gb"])
            for r in (4, 8)}
    assert scripts and asked == want, (asked, want)
    assert not any("--gpus" in s.read_text() or "--gres" in s.read_text() for s in scripts)


def test_run_sweep_on_slurm_writes_every_record_and_the_report(cli, slurm_cluster):
    sweep = cli.cwd / "sweep"
    proc = cli("run", "+exp=demo", *FAST_RUN, "-m", "merge.bottom=1,2", "hydra/launcher=slurm",
               f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = records(sweep, 2)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert {r["config"]["merge"]["bottom"] for r in recs} == {1, 2}
    swaps = {a["path"] for r in recs for a in r["artifacts"] if a["role"] == "merged" and "swap" in a["path"]}
    assert len(swaps) == 2
    table = (sweep / "report" / "table.md").read_text()
    assert len([l for l in table.splitlines() if l.startswith("| swap (")]) >= 2, table


def test_a_point_killed_by_the_cluster_is_reported_with_its_log(cli, slurm_cluster):
    """Point #0 gets 300 MB (adapter.r=3 -> 300M), which SLURM kills it for; #1 has 4 GB."""
    sweep = cli.cwd / "sweep"
    proc = cli("train", "-m", "adapter.r=3,40", "hydra/launcher=slurm", "+resources.mem_gb=null",
               "+resources.mem_per_cpu=${adapter.r}00M", *FAST_TRAIN, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-4000:]
    failed = [l for l in proc.stderr.splitlines() if l.startswith("polyft: sweep point #")]
    assert len(failed) == 1 and "#0" in failed[0], proc.stderr[-3000:]
    log = Path(failed[0].rsplit("log: ", 1)[1])
    assert log.is_file() and "memory" in log.read_text().lower()
    ok = json.loads((sweep / "1" / "run.json").read_text())
    assert ok["status"] == "ok" and ok["config"]["adapter"]["r"] == 40 and not ok["artifacts"][0]["reused"]


@pytest.mark.parametrize("args,words", [
    (["hydra.launcher.cpus_per_task=-2"], ["hydra.launcher.cpus_per_task=-2", ">= 1"]),
    (["hydra.launcher.mem_gb=-4"], ["hydra.launcher.mem_gb=-4"]),
    (["hydra.launcher.timeout_min=0"], ["hydra.launcher.timeout_min=0"]),
    (["+resources.mem_per_cpu=lots"], ["resources.mem_per_cpu=lots", "16G"]),
    (["+resources.cpu=2"], ["resources.cpu", "not a launcher key"]),
])
def test_launcher_values_are_checked_before_submitting(cli, args, words):
    proc = cli("train", "-m", "adapter.r=4,8", "hydra/launcher=slurm", *args)
    assert_user_error(proc, *words)
    assert not (cli.cwd / "outputs" / "multirun").exists()


def test_unknown_partition_is_refused(cli, slurm_cluster):
    proc = cli("train", "-m", "adapter.r=4", "hydra/launcher=slurm", "hydra.launcher.partition=nosuch")
    assert_user_error(proc, "hydra.launcher.partition=nosuch", "debug")


def test_stop_leaves_no_daemon_running(slurm_cluster):
    assert set(daemons()) >= {"slurmctld", "slurmd", "munged"}
    assert slurm("stop").returncode == 0
    assert daemons() == []
    assert slurm("start").returncode == 0  # back up for whatever runs after
    assert set(daemons()) >= {"slurmctld", "slurmd", "munged"}


def alive(pid: int) -> bool:
    """Running (a zombie left for init to reap is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes(*names: str) -> dict[int, tuple[str, str]]:
    """pid -> (name, command line) of the live processes called `names`."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            name = proc.joinpath("comm").read_text().strip()
            if name in names and alive(int(proc.name)):
                out[int(proc.name)] = (name, proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            pass
    return out


def test_stop_during_a_job_teardown_ends_the_hung_step_and_every_daemon(slurm_cluster, tmp_path):
    """A job that ignores SIGTERM is cancelled, and while it tears down its slurmstepd hangs
    (stopped here with SIGSTOP); `stop` then has to end the step, what it started, and the
    daemons, and says what it killed."""
    pidfile = tmp_path / "task.pid"
    job = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "out"), "--wrap",
                          f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 1; done"],
                         capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    task = int(pidfile.read_text())
    step = [p for p, (_, cmd) in processes("slurmstepd").items() if f"[{job}." in cmd]
    daemons = processes("slurmctld", "slurmscriptd", "slurmd", "munged")
    assert len(step) == 1 and {n for n, _ in daemons.values()} == {"slurmctld", "slurmscriptd", "slurmd", "munged"}, \
        (step, daemons)
    subprocess.run(["scancel", job], check=True)
    while subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], capture_output=True,
                         text=True).stdout.strip() != "CG" and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in step:
        os.kill(p, signal.SIGSTOP)

    proc = slurm("stop")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"killed a hung job step: slurmstepd: \[{job}\.batch\] \(pid {step[0]}\)", proc.stderr), proc.stderr
    left = {p: c for p, c in {**daemons, step[0]: "slurmstepd", task: "job script"}.items() if alive(p)}
    assert left == {}
    assert slurm("start").returncode == 0  # back up for whatever runs after
