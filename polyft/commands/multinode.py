"""One training over the nodes of a SLURM allocation.

When the job `polyft train` (or `polyft run`) runs in spans several nodes (a point of
`hydra/launcher=slurm` with `hydra.launcher.nodes=N`, which runs the command once, on the
first node; or `polyft train` typed inside `salloc -N N`), the training is started with
`srun` on every node of the allocation, one task per node, each task a torchrun agent with
`train.num_processes / N` workers. The agents meet at a c10d rendezvous whose store is on
the allocation's first node (the first of `scontrol show hostnames $SLURM_JOB_NODELIST`,
the node with SLURM_NODEID 0), torch.distributed assigns the ranks, and rank 0 writes the
product and the summary to the shared filesystem.

`python -m polyft.commands.multinode` is what srun runs on each node: it turns the node's
SLURM_NODEID into torchrun's arguments and becomes torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from polyft import console
from polyft.config.experiment import expert_cfg
from polyft.errors import ConfigError, PolyftError

RDZV_PORT = 29400  # torchrun's default c10d port; the job id moves it, so jobs sharing a node differ


def job_nodes() -> int:
    """Nodes of the SLURM job this process runs in (1 outside SLURM)."""
    if "SLURM_JOB_ID" not in os.environ:
        return 1
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def per_node(num_processes: int, nodes: int, where: str = "train.num_processes") -> int:
    """Processes per node: train.num_processes is the world size, spread evenly over the nodes."""
    if num_processes % nodes:
        raise ConfigError(f"{where}={num_processes} does not spread over {nodes} nodes; over several "
                          f"nodes it is the world size, a multiple of the nodes (e.g. {nodes * max(1, num_processes // nodes)})")
    return num_processes // nodes


def check_nodes(cfg, launcher: dict, where: str) -> None:
    """A sweep point asking for several nodes: every training it runs spreads over them, with
    the GPUs per node the launcher asks for (checked before anything is submitted)."""
    nodes = launcher.get("nodes") or 1
    if nodes <= 1:
        return
    if cfg.command not in ("train", "run"):
        raise ConfigError(f"{where}.nodes={nodes}: only train and run spread over several nodes; "
                          f"polyft {cfg.command} runs on one (hydra.launcher.nodes=1)")
    configs = [(cfg, "train.num_processes")] + [
        (expert_cfg(cfg, name), f"experts.{name}.train.num_processes") for name in (cfg.get("experts") or {})]
    gpus = launcher.get("gpus_per_node") or 0
    for one, key in configs:
        n = per_node(one.train.num_processes, nodes, key)
        if gpus and gpus != n:
            raise ConfigError(f"{where}.gpus_per_node={gpus} but {key}={one.train.num_processes} over "
                              f"{nodes} nodes runs {n} process{'es' if n != 1 else ''} per node; make them agree")


def first_node() -> str:
    """The allocation's first node, where the rendezvous store lives."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired, KeyError) as exc:
        raise PolyftError(f"cannot list the nodes of SLURM job {os.environ.get('SLURM_JOB_ID')}: {exc}") from exc
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise PolyftError(f"scontrol show hostnames {os.environ['SLURM_JOB_NODELIST']} failed: {out.stderr.strip()}")
    return hosts[0]


def srun_command(nodes: int, nproc: int, worker: list[str]) -> list[str]:
    """srun over the job's nodes, one torchrun agent each; `worker` is the module and the
    arguments every worker process runs (`-m polyft.commands.train ...`)."""
    job = os.environ["SLURM_JOB_ID"]
    endpoint = f"{first_node()}:{RDZV_PORT + int(job.split('_')[0]) % 1000}"
    console.echo(f"polyft: one training over {nodes} nodes ({os.environ['SLURM_JOB_NODELIST']}) x {nproc} "
                 f"process{'es' if nproc > 1 else ''}, rendezvous at {endpoint}")
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    cpus, tasks = os.environ.get("SLURM_CPUS_PER_TASK"), os.environ.get("SLURM_NTASKS_PER_NODE")
    if cpus and tasks and tasks.isdigit():  # the one agent per node gets all the CPUs asked per node
        cmd.append(f"--cpus-per-task={int(cpus) * int(tasks)}")
    return [*cmd, sys.executable, "-m", "polyft.commands.multinode", str(nodes), str(nproc), endpoint,
            f"polyft-{job}-{uuid.uuid4().hex[:8]}", *worker]


def agent_command(nodes: int, nproc: int, endpoint: str, rdzv_id: str, worker: list[str],
                  node_id: int) -> list[str]:
    """torchrun for node `node_id` (SLURM_NODEID): node 0 hosts the rendezvous store."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=is_host={int(node_id == 0)}", *worker]


if __name__ == "__main__":
    nodes, nproc, endpoint, rdzv_id, *worker = sys.argv[1:]
    cmd = agent_command(int(nodes), int(nproc), endpoint, rdzv_id, worker, int(os.environ["SLURM_NODEID"]))
    os.execv(cmd[0], cmd)
