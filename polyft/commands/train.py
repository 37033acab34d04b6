"""`polyft train`: supervised fine-tuning (full, LoRA, QLoRA 4/8-bit, FLix) through TRL.

Reads top to bottom: `preflight` refuses, before a directory is made, what the files say
cannot run (the model directory, target modules, an adapter to continue, the data and its
chat template); `command` trains the configured model, or each expert of an experiment,
into the artifact store (skipped when the product exists; an interrupted run resumes from
its last checkpoint). Several processes: the command re-launches itself under torchrun;
in a SLURM job over several nodes, under srun + torchrun on every node (commands.multinode).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from polyft import console, sharding, tracking, training
from polyft.commands import multinode
from polyft.config.schema import RootConfig, to_container
from polyft.data.formatting import check_chat_template, is_chat
from polyft.data.mixture import load_mixture
from polyft.data.sources import load_source
from polyft.errors import ConfigError, PolyftError
from polyft.models.gguf import source_of
from polyft.models.card import card, command_line, overrides_of, write_card
from polyft.models.load import (builds_tiny, check_model_dir, is_offline, looks_like_hub_id, model_config_json,
                                safetensors_names)
from polyft.products import existing_product, expert_config, init_dir, run_name, train_plan
from polyft.runs import config_hash

# Module names of the tiny models (they are Llama/Mistral layouts), checked without torch.
TINY_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def selected(cfg) -> list:
    """The configs to train: the run's own, or each expert of its experiment (`expert=NAME`: one)."""
    if not cfg.experts:
        return [cfg]
    return [expert_config(cfg, name) for name in ([cfg.expert] if cfg.expert else list(cfg.experts))]


# ---------------------------------------------------------------- preflight (files, no torch)

def preflight(cfg) -> None:
    for one in selected(cfg):
        _preflight_one(one)


def _preflight_one(cfg) -> None:
    a = cfg.adapter
    if a.type == "lora" and a.match and a.match not in cfg.experts:
        raise ConfigError(f"adapter.match={a.match}: not an expert of this experiment; match names "
                          "an expert with adapter=flix")
    if a.type == "full" and cfg.quant.bits:
        raise ConfigError(f"quant={cfg.quant.name} needs an adapter; full fine-tuning of a "
                          "quantised base is not possible (use adapter=lora)")
    sharding.preflight(cfg)
    p = train_plan(cfg, build_model=False)
    if not builds_tiny(cfg.model):
        check_model_dir(p.model_path, "model.path", cfg.allow_pickle)
        if looks_like_hub_id(p.model_path) and model_config_json(cfg.model, cfg.output_root, cfg.offline) is None:
            raise PolyftError(f"model.path={p.model_path}: its config.json cannot be read from the hub (no "
                              "connection, a gated model without a token, or no such repo); check the id, "
                              "or download it and set model.path=/local/dir")
    _check_targets(cfg, p.model_path)
    init_file = "flix_config.json" if a.type == "flix" else "adapter_config.json"
    if a.init_from and a.init_from not in cfg.experts and not (Path(a.init_from) / init_file).is_file():
        raise PolyftError(f"adapter.init_from={a.init_from}: not an adapter directory (no {init_file}) "
                          f"nor an expert of this experiment")
    if p.target is not None and p.target.exists() and any(p.target.iterdir()) and existing_product(p) is None:
        raise PolyftError(f"output_dir={p.target} exists and holds something else; remove it or "
                          "choose another path")
    rows = load_mixture(cfg.data, is_offline(cfg.offline))
    if any(is_chat(r) for r in rows):  # prompt/response rows and chats are rendered as chat turns
        check_chat_template(p.model_path, cfg.model.chat_template)
    if a.type == "flix":
        _check_flix_sources(cfg)


def _check_targets(cfg, model_path: str) -> None:
    wanted = [m for m in cfg.adapter.target_modules if m != "all-linear"]
    if cfg.adapter.type == "full" or not wanted:
        return
    if builds_tiny(cfg.model):
        names = TINY_LINEAR
    elif Path(model_path).is_dir():
        names = {n.rsplit(".", 2)[-2] for n in safetensors_names(model_path) if n.endswith(".weight")}
    else:
        return  # a hub id: peft checks it when the model is loaded
    missing = [m for m in wanted if m not in names]
    if missing:
        raise ConfigError(f"adapter.target_modules: {', '.join(missing)} not in the model; "
                          f"its linear modules include: {', '.join(sorted(set(names) & set(TINY_LINEAR)) or sorted(names)[:12])}")


def _check_flix_sources(cfg) -> None:
    """Every source gives each of its rows a value for every FLix feature."""
    for name, src in cfg.data.sources.items():
        rows = load_source(f"data.sources.{name}", src, cfg.data.seed, is_offline(cfg.offline))
        for ftype in cfg.adapter.features:
            if any(not r.get(ftype) for r in rows):
                raise PolyftError(f"data.sources.{name}: rows without a {ftype} value, which adapter=flix "
                                  f"needs; set data.sources.{name}.features.{ftype}=VALUE")


# ---------------------------------------------------------------- command

def command(cfg, record) -> None:
    for one in selected(cfg):
        train_one(one, record)


def train_one(cfg, record) -> None:
    p = train_plan(cfg)
    record.extra["product"] = {"kind": p.kind, "name": p.name, "hash": config_hash(p.key)}
    if cfg.adapter.type == "lora" and not cfg.adapter.init_from:  # the alpha used, also when it followed the rank
        record.extra["product"]["lora_alpha"] = p.key["adapter"]["alpha"]
    if source_of(p.model_path):  # a base converted from a GGUF file: which file, which bytes
        record.extra["model_source"] = source_of(p.model_path)
    work_dir = p.store.work_dir(p.kind, p.name, p.key)  # checkpoints survive a killed run
    since = []
    tracked = tracked_run(cfg, p, record)
    if cfg.train.num_processes == 1 and cfg.train.distributed != "ddp":
        console.echo(f"polyft: train.distributed={cfg.train.distributed} with one process: nothing to shard, "
                     "trained as one process (set train.num_processes)")

    def make(build):
        since.append(console.started(f"training {p.kind} {p.name}"))
        nodes = multinode.job_nodes()
        if (cfg.train.num_processes > 1 or nodes > 1) and "LOCAL_RANK" not in os.environ:
            summary = relaunch(cfg, record.run_dir, work_dir, build.dir, tracked, nodes)
        else:
            summary = training.train(cfg, p.model_path, work_dir, build.dir, record.run_dir,
                                     init_dir(cfg) if cfg.adapter.init_from else None, tracked)
        build.manifest.update(summary.pop("manifest"))
        write_card(build.dir, model_card(cfg, p.name, build, record.run_dir))
        return summary

    got = p.store.obtain(p.kind, p.name, p.key, make, p.target)
    if got.reused:
        copied = {"copied_from": str(got.copied_from.resolve())} if got.copied_from else {}
        record.add_artifact(p.kind, got.path, reused=True, name=p.name, **copied)
        console.echo(f"polyft: {p.kind} {p.name} already trained: " + (
            f"copied {got.copied_from} to {got.path}" if got.copied_from else str(got.path)))
        return
    shutil.rmtree(work_dir, ignore_errors=True)
    summary = got.result
    if summary.get("tracking"):
        record.extra.setdefault("tracking", []).append(summary.pop("tracking"))
    history = summary.pop("history")
    if cfg.command == "train" and not cfg.experts:  # a single training: the run's own history
        record.history = history
        record.metrics.update(final_loss=history[-1]["loss"] if history else None,
                              first_loss=history[0]["loss"] if history else None)
        if summary.get("eval_history"):  # the validation set's loss after the last step
            record.metrics["eval_loss"] = summary["eval_history"][-1]["eval_loss"]
        record.extra["train"] = {**summary, "artifact": str(got.path)}
    else:  # one of an experiment's experts
        record.extra.setdefault("trained", {})[p.name] = {**summary, "artifact": str(got.path), "history": history}
    record.add_artifact(p.kind, got.path, reused=False, name=p.name)
    console.done(since[0], f"{p.kind} {p.name} written to {got.path}")


def tracked_run(cfg, p, record) -> tracking.Tracked:
    """The W&B / TensorBoard run of this training: named after the product, grouped by the
    experiment or sweep, with polyft's composed config and the product's identity."""
    sweep = record.extra.get("sweep")
    config = {k: v for k, v in to_container(cfg).items() if k != "expert_root"}
    product = {"kind": p.kind, "name": p.name, "hash": config_hash(p.key), "run_name": run_name(p)}
    return tracking.Tracked(run_name(p), tracking.group_name(cfg.exp_name, cfg.command, sweep), "train",
                            {"polyft": config, "product": product, **({"sweep_point": sweep["point"]} if sweep else {})})


def model_card(cfg, name: str, build, run_dir) -> str:
    """The product's README.md: the run's command line and, for an experiment's expert, the
    command that trains that expert alone."""
    overrides = overrides_of(run_dir)
    made_by = command_line(cfg.command, overrides) if overrides is not None else None
    alone = None
    if overrides is not None and cfg.get("expert"):
        alone = command_line("train", [o for o in overrides if not o.startswith("expert=")] + [f"expert={cfg.expert}"])
    conf = next((build.dir / f for f in ("adapter_config.json", "flix_config.json") if (build.dir / f).is_file()), None)
    base_ref = json.loads(conf.read_text()).get("base_model_name_or_path") if conf else None
    return card(name, build.manifest, made_by, alone, run_dir, base_ref)


# ---------------------------------------------------------------- several processes

def relaunch(cfg, run_dir: Path, work_dir: Path, out_dir: Path, tracked: tracking.Tracked | None = None,
             nodes: int = 1) -> dict:
    """Run the training under torchrun with N processes (over `nodes` SLURM nodes: srun starts
    a torchrun on each); rank 0 writes the product and the summary."""
    conf_file, result = run_dir / "train_config.yaml", run_dir / "train_result.json"
    OmegaConf.save(cfg, conf_file, resolve=True)
    (run_dir / "train_tracked.json").write_text(json.dumps(asdict(tracked) if tracked else None, default=str))
    init = init_dir(cfg) if cfg.adapter.init_from else ""
    worker = ["-m", "polyft.commands.train", str(conf_file), str(result), str(work_dir), str(out_dir), init]
    if nodes > 1:
        cmd = multinode.srun_command(nodes, multinode.per_node(cfg.train.num_processes, nodes), worker)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.train.num_processes}", *worker]
    proc = subprocess.run(cmd, env={**os.environ, "POLYFT_WORKER": "1"})
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}); see the log in {run_dir}")
    return json.loads(result.read_text())


def _worker(conf_file: str, result_file: str, work_dir: str, out_dir: str, init: str) -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(conf_file))
    run_dir = Path(result_file).parent
    tracked = json.loads((run_dir / "train_tracked.json").read_text())
    summary = training.train(cfg, train_plan(cfg).model_path, Path(work_dir), Path(out_dir),
                             run_dir, init or None, tracking.Tracked(**tracked) if tracked else None)
    if int(os.environ.get("RANK", "0")) == 0:
        summary["nodes"] = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun agents that met
        Path(result_file).write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
