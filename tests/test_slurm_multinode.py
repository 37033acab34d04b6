"""One training over two SLURM nodes, on a real two-node cluster made of network namespaces
(scripts/slurm_local.sh start-multinode: one slurmd per namespace, each with its own address
on a private bridge; CPU processes on gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, assert_user_error

SCRIPT = REPO / "scripts" / "slurm_local.sh"
STATE = Path(os.environ.get("POLYFT_SLURM_MULTI_STATE", "/var/tmp/polyft-slurm-multi"))
NODES = ("polyft-n1", "polyft-n2")
BRIDGE = "polyft-br0"
# Three optimizer steps on the demo data; dropout 0, so the one-process run and the
# two-node run see the same examples per step and differ only in how the sum is reduced.
SAME = ["logger=none", "train.max_steps=3", "train.save_steps=3", "adapter.dropout=0"]


def script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=600)


def alive(pid: int) -> bool:
    """Running (a zombie left for init to reap is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cluster_processes() -> dict[int, str]:
    """Every process of the multi-node cluster: all that runs in its namespaces (slurmctld,
    the slurmds, job steps) and its munged (started with the cluster's own socket)."""
    pids = set()
    for ns in NODES:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids |= {int(p) for p in out.stdout.split()}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(STATE) in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                pids.add(int(proc.name))
        except OSError:
            pass
    return {p: Path(f"/proc/{p}/comm").read_text().strip() for p in pids if alive(p)}


def namespaces_and_bridge() -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    left = [n for n in NODES if n in names]
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
        left.append(BRIDGE)
    return left


def test_one_training_over_two_nodes_equals_one_process(cli, tiny_llama_dir):
    if os.geteuid() != 0:
        pytest.skip("the two-node cluster needs root (network namespaces, slurm-wlm from apt-get)")
    one, two, sweep = cli.cwd / "one", cli.cwd / "two", cli.cwd / "sweep"
    # the reference: one process, global batch 8
    proc = cli("train", *SAME, "train.batch_size=8", f"output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    up = script("start-multinode")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        daemons = cluster_processes()
        assert sorted(daemons.values()) == ["munged", "slurmctld", "slurmd", "slurmd", "slurmscriptd"], daemons
        # one sweep point over 2 nodes x 1 process, batch 4 each: global batch 8
        proc = cli("train", "-m", *SAME, "train.batch_size=4", "train.num_processes=2", "hydra/launcher=slurm",
                   "hydra.launcher.nodes=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
                   f"output_dir={two}", f"hydra.sweep.dir={sweep}", env={"SLURM_CONF": str(STATE / "slurm.conf")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        (job,) = [d.name for d in (sweep / ".submitit").iterdir() if d.is_dir()]
        logs = {n: (STATE / "log" / f"slurmd-{n}.log").read_text() for n in NODES}
    finally:
        down = script("stop-multinode")
    assert down.returncode == 0, down.stderr[-3000:]
    # the cluster is gone: no daemon, no job step, no namespace, no bridge
    assert not [p for p in daemons if alive(p)], {p: c for p, c in daemons.items() if alive(p)}
    assert cluster_processes() == {}
    assert namespaces_and_bridge() == []

    # one job over both nodes: its step (srun, one torchrun agent per node) ran a task on each,
    # the agents met (torch's group world size is 2) and made one world of 2 ranks
    for node, log in logs.items():
        assert re.search(rf"launch task StepId={job}\.0 ", log), (node, log[-2000:])
    record = json.loads((sweep / "0" / "run.json").read_text())
    assert record["status"] == "ok"
    assert record["train"]["world_size"] == 2 and record["train"]["nodes"] == 2
    submission = next((sweep / ".submitit" / job).glob("*_submission.sh")).read_text()
    assert "#SBATCH --nodes=2" in submission and "\nsrun " not in submission

    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    trained = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # B starts at zero
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"two nodes vs one process: max abs difference {diff:.3g} (largest lora_B entry {trained:.3g})")
    assert trained > 1e-3 and diff <= 1e-5, (diff, trained)


@pytest.mark.parametrize("command,args,words", [
    ("train", ["train.num_processes=3"], ["train.num_processes=3", "2 nodes"]),
    ("train", ["train.num_processes=2", "hydra.launcher.gpus_per_node=4"],
     ["hydra.launcher.gpus_per_node=4", "1 process per node"]),
    ("eval", [], ["hydra.launcher.nodes=2", "only train and run"]),
])
def test_a_layout_that_does_not_spread_over_the_nodes_is_refused(cli, command, args, words):
    proc = cli(command, "-m", "seed=1,2", "hydra/launcher=slurm", "hydra.launcher.nodes=2", *args)
    assert_user_error(proc, *words)
    assert not (cli.cwd / "outputs" / "multirun").exists()
