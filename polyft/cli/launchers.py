"""Hydra launchers on submitit: one SLURM job (or local process) per sweep point.

What they add to hydra-submitit-launcher, whose presets are conf/hydra/launcher/:
- each point gets its own resources: the run key `resources` overrides launcher values per
  point (`-m +resources.mem_gb=8,32`; Hydra refuses to sweep hydra.* keys), and with
  `plan.fit=true` mem_gb/gres come from the point's memory estimate
  (polyft.commands.plan.fit_resources); points with the same resources share one job array;
- no GPU is asked for unless gpus_per_node > 0, so the defaults run on a CPU-only cluster;
- a point that fails (an error, or killed by the cluster: memory, time) is reported with
  its log path once every point has ended, instead of stopping the sweep at the first
  failure; the report over the finished points is still written, and the command exits 1;
- job states come from squeue, never sacct, which clusters without accounting refuse;
- a point over several nodes (`nodes` > 1) is one job whose batch script runs the command
  once, on the first node (no srun around it); the command spreads each training over the
  allocation itself (polyft.commands.multinode).

`check_launcher` holds the rules for launcher values; the CLI runs it before submitting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _LocalBase
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SlurmBase
from omegaconf import OmegaConf

from polyft.checks import Custom, Flag, Items, Number, Text
from polyft.commands.multinode import check_nodes
from polyft.commands.plan import fit_resources
from polyft.errors import ConfigError

# Lines describing the failed points of the sweeps launched in this process (cli.main exits 1).
FAILED: list[str] = []
_BASE_KEYS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
              "name", "stderr_to_stdout"}
_NOT_PARAMS = {"_target_", "submitit_folder", "max_num_timeout"}
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.I)
_GRES = re.compile(r"^[\w.-]+(:[\w.-]+)*(,[\w.-]+(:[\w.-]+)*)*$")


def _memory(key: str, value) -> None:
    if value is not None and (not _MEM.match(str(value)) or int(re.sub(r"\D", "", str(value))) <= 0):
        raise ConfigError(f"{key}={value} is not allowed; give a size such as 4000M or 16G")


def _gres(key: str, value) -> None:
    if value is not None and not _GRES.match(str(value)):
        raise ConfigError(f"{key}={value} is not allowed; give e.g. gpu:1 or gpu:a100:2")


def _mapping(key: str, value) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value} is not allowed; give a mapping of sbatch options")


def _text(why: str) -> Text:
    return Text(why, null=True)


# Every key of polyft's launchers (conf/hydra/launcher, over hydra-submitit-launcher's
# schema): its rule, or, for text passed to sbatch as given, why any text is allowed.
LAUNCHER_VALUES = {
    "cpus_per_task": Number(1, integer=True, null=True), "tasks_per_node": Number(1, integer=True, null=True),
    "nodes": Number(1, integer=True, null=True), "timeout_min": Number(1, integer=True, null=True),
    "gpus_per_node": Number(0, integer=True, null=True), "gpus_per_task": Number(0, integer=True, null=True),
    "cpus_per_gpu": Number(1, integer=True, null=True), "array_parallelism": Number(1, integer=True, null=True),
    "max_num_timeout": Number(0, integer=True, null=True), "signal_delay_s": Number(0, integer=True, null=True),
    "mem_gb": Number(0, low_open=True, null=True),
    "mem_per_cpu": Custom(_memory, "a size such as 4000M", ("lots", "0M")),
    "mem_per_gpu": Custom(_memory, "a size such as 16G", ("lots", "0G")),
    "gres": Custom(_gres, "a SLURM gres such as gpu:a100:1", ("gpu a100",)),
    "stderr_to_stdout": Flag(),
    "additional_parameters": Custom(_mapping, "more sbatch options", ("abc",)),
    "partition": _text("a partition of the cluster (checked against sinfo when there is one)"),
    "account": _text("a SLURM account"), "qos": _text("a SLURM QOS"), "comment": _text("a job comment"),
    "constraint": _text("node features, as sbatch --constraint takes them"),
    "exclude": _text("node names, as sbatch --exclude takes them"),
    "setup": Items(Text("a shell line run before the job", null=False), null=True),
    "name": _text("the job name"), "submitit_folder": _text("a directory"),
    "_target_": _text("the launcher class, set by the preset"),
}


def check_launcher(launcher, where: str = "hydra.launcher", resources=None) -> None:
    """Values a submitit launcher config would pass to sbatch or the local executor, with a
    run's `resources` over them."""
    if resources:
        unknown = sorted(set(resources) - set(launcher or {}) - {"_target_"})
        if launcher is None or "polyft_launchers" not in str(launcher.get("_target_", "")):
            raise ConfigError("resources: set only with hydra/launcher=slurm or submitit_local")
        if unknown:
            raise ConfigError(f"resources.{unknown[0]}: not a launcher key; allowed: "
                              f"{', '.join(k for k in launcher if k not in _NOT_PARAMS)}")
        launcher = {**launcher, **resources}
        where = "resources"
    if launcher is None or "submitit" not in str(launcher.get("_target_", "")) \
            and "polyft_launchers" not in str(launcher.get("_target_", "")):
        return
    for key, value in launcher.items():
        rule = LAUNCHER_VALUES.get(key)
        if rule is not None:  # a launcher of another plugin's keys: that plugin's to check
            rule.check(f"{where}.{key}", value)
    partition = launcher.get("partition")
    if partition is not None and "Slurm" in str(launcher.get("_target_", "")):
        known = cluster_partitions()
        if known is not None and str(partition) not in known:
            raise ConfigError(f"{where}.partition={partition}: no such partition on this cluster; "
                              f"available: {', '.join(sorted(known))}")


def cluster_partitions() -> set[str] | None:
    """The partitions `sinfo` knows, or None when there is no reachable cluster to ask."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    return names if out.returncode == 0 and names else None


def submitit_params(launcher: dict, executor: str) -> dict:
    """A launcher config as submitit's executor parameters (as the Hydra plugin names them)."""
    params = {k: v for k, v in launcher.items() if k not in _NOT_PARAMS}
    if not params.get("gpus_per_node"):
        params["gpus_per_node"] = None  # no --gpus-per-node at all: a CPU-only cluster rejects even 0
    if executor == "local":
        return {k: v for k, v in params.items() if k in _BASE_KEYS}
    if (params.get("nodes") or 1) > 1:
        params["use_srun"] = False  # srun per node is the training's own (commands.multinode)
    return {k if k in _BASE_KEYS else f"{executor}_{k}": v for k, v in params.items()}


def _last_line(path: Path) -> str:
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


class _PerPointLauncher:
    """The launch() shared by the SLURM and the local launcher."""

    _EXECUTOR = "abstract"

    def launch(self, job_overrides, initial_job_idx):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobReturn, JobStatus, filter_overrides

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list] = {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            point = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            launcher = OmegaConf.to_container(point.hydra.launcher, resolve=True)
            if point.plan.fit:
                launcher.update(fit_resources(point, launcher))
            launcher.update(OmegaConf.to_container(point.resources, resolve=True))
            check_launcher(launcher, f"point #{idx}: hydra.launcher")
            if self._EXECUTOR == "slurm":
                check_nodes(point, launcher, f"point #{idx}: hydra.launcher")
            print(f"polyft: point #{idx} {' '.join(filter_overrides(overrides))}", file=sys.stderr)
            key = repr(sorted(launcher.items()))
            groups.setdefault(key, [launcher, []])[1].append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        submitted = []  # (idx, overrides, job)
        for launcher, args in groups.values():
            executor = submitit.AutoExecutor(folder=launcher["submitit_folder"], cluster=self._EXECUTOR,
                                             **({f"{self._EXECUTOR}_max_num_timeout": launcher["max_num_timeout"]}
                                                if "max_num_timeout" in launcher else {}))
            executor.update_parameters(**submitit_params(launcher, self._EXECUTOR))
            jobs = executor.map_array(self, *zip(*args))
            submitted += [(a[2], a[0], j) for a, j in zip(args, jobs)]
        submitted.sort(key=lambda t: t[0])
        self._wait([j for _, _, j in submitted])
        returns = []
        for idx, overrides, job in submitted:
            ret, why = None, None
            if job.paths.result_pickle.exists():
                try:
                    ret = (job.task(0) if job.num_tasks > 1 else job).result()  # task 0 runs the command
                except Exception as exc:  # the job raised: submitit keeps its traceback
                    why = _last_line_of(str(exc))
                if ret is not None and ret.status == JobStatus.FAILED:
                    why = f"{type(ret._return_value).__name__}: {ret._return_value}"
            else:
                why = f"ended without a result ({self._state(job)}): {_last_line(job.paths.stderr)}"
            if why is None:
                returns.append(ret)
                continue
            line = (f"sweep point #{idx} ({' '.join(filter_overrides(overrides))}) failed: {why}; "
                    f"log: {job.paths.stderr}")
            FAILED.append(line)
            print(f"polyft: {line}", file=sys.stderr)
            # Hydra stops a sweep at the first failed JobReturn; the failure is reported above
            # and turned into the exit status by the CLI, so the sweep's report is still written.
            returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                     _return_value=None))
        return returns

    def _wait(self, jobs) -> None:
        for job in jobs:
            job.wait()

    def _state(self, job) -> str:
        return "process exited"


def _last_line_of(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else "unknown error"


class PerPointSlurmLauncher(_PerPointLauncher, _SlurmBase):
    _EXECUTOR = "slurm"
    POLL_S = 2.0
    GRACE_S = 10.0  # a result written just before the job left the queue may show late on NFS

    def _queued(self, jobs) -> set[str] | None:
        """Job ids still in the queue (pending, running, completing), or None if squeue failed."""
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(ids)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return set() if "Invalid job id" in out.stderr else None
        return {line.strip() for line in out.stdout.splitlines() if line.strip()}

    def _wait(self, jobs) -> None:
        pending, gone = list(jobs), {}
        while pending:
            pending = [j for j in pending if not j.paths.result_pickle.exists()]
            queued = self._queued(pending) if pending else set()
            if queued is not None:
                now = time.time()
                for j in pending:
                    if j.job_id not in queued:
                        gone.setdefault(j.job_id, now)
                pending = [j for j in pending if j.job_id not in gone or now - gone[j.job_id] < self.GRACE_S]
            if pending:
                time.sleep(self.POLL_S)

    def _state(self, job) -> str:
        out = subprocess.run(["scontrol", "-o", "show", "job", job.job_id], capture_output=True, text=True)
        m = re.search(r"JobState=(\S+).*?ExitCode=(\S+)", out.stdout)
        return f"state {m.group(1)}, exit code {m.group(2)}" if m else "state unknown"


class PerPointLocalLauncher(_PerPointLauncher, _LocalBase):
    _EXECUTOR = "local"
