"""`polyft train`: supervised fine-tuning (full, LoRA, QLoRA 4/8-bit, FLix) through TRL.

Reads top to bottom: `preflight` refuses, before a directory is made, what the files say
cannot run (the model directory, target modules, an adapter to continue, the data and its
chat template); `command` trains the configured model, or each expert of an experiment,
into the artifact store (skipped when the product exists; an interrupted run resumes from
its last checkpoint). Several processes: the command re-launches itself under torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from polyft import console, sharding, training
from polyft.config.schema import RootConfig
from polyft.data.formatting import check_chat_template
from polyft.data.mixture import load_mixture
from polyft.data.sources import load_source
from polyft.errors import ConfigError, PolyftError
from polyft.models.gguf import source_of
from polyft.models.load import builds_tiny, check_model_dir, is_offline, safetensors_names
from polyft.products import existing_product, expert_config, init_dir, train_plan
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
    _check_targets(cfg, p.model_path)
    init_file = "flix_config.json" if a.type == "flix" else "adapter_config.json"
    if a.init_from and a.init_from not in cfg.experts and not (Path(a.init_from) / init_file).is_file():
        raise PolyftError(f"adapter.init_from={a.init_from}: not an adapter directory (no {init_file}) "
                          f"nor an expert of this experiment")
    if p.target is not None and p.target.exists() and any(p.target.iterdir()) and existing_product(p) is None:
        raise PolyftError(f"output_dir={p.target} exists and holds something else; remove it or "
                          "choose another path")
    rows = load_mixture(cfg.data, is_offline(cfg.offline))
    if any(r["prompt"] for r in rows):  # prompt/response rows are rendered as chat turns
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
    if cfg.train.num_processes == 1 and cfg.train.distributed != "ddp":
        console.echo(f"polyft: train.distributed={cfg.train.distributed} with one process: nothing to shard, "
                     "trained as one process (set train.num_processes)")

    def make(build):
        since.append(console.started(f"training {p.kind} {p.name}"))
        if cfg.train.num_processes > 1 and "LOCAL_RANK" not in os.environ:
            summary = relaunch(cfg, record.run_dir, work_dir, build.dir)
        else:
            summary = training.train(cfg, p.model_path, work_dir, build.dir, record.run_dir,
                                     init_dir(cfg) if cfg.adapter.init_from else None)
        build.manifest.update(summary.pop("manifest"))
        return summary

    got = p.store.obtain(p.kind, p.name, p.key, make, p.target)
    if got.reused:
        record.add_artifact(p.kind, got.path, reused=True, name=p.name)
        console.echo(f"polyft: {p.kind} {p.name} already trained: {got.path}")
        return
    shutil.rmtree(work_dir, ignore_errors=True)
    summary = got.result
    history = summary.pop("history")
    if cfg.command == "train" and not cfg.experts:  # a single training: the run's own history
        record.history = history
        record.metrics.update(final_loss=history[-1]["loss"] if history else None,
                              first_loss=history[0]["loss"] if history else None)
        record.extra["train"] = {**summary, "artifact": str(got.path)}
    else:  # one of an experiment's experts
        record.extra.setdefault("trained", {})[p.name] = {**summary, "artifact": str(got.path), "history": history}
    record.add_artifact(p.kind, got.path, reused=False, name=p.name)
    console.done(since[0], f"{p.kind} {p.name} written to {got.path}")


# ---------------------------------------------------------------- several processes

def relaunch(cfg, run_dir: Path, work_dir: Path, out_dir: Path) -> dict:
    """Run the training under torchrun with N processes; rank 0 writes the product and the summary."""
    conf_file, result = run_dir / "train_config.yaml", run_dir / "train_result.json"
    OmegaConf.save(cfg, conf_file, resolve=True)
    init = init_dir(cfg) if cfg.adapter.init_from else ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={cfg.train.num_processes}", "-m", "polyft.commands.train",
           str(conf_file), str(result), str(work_dir), str(out_dir), init]
    proc = subprocess.run(cmd, env={**os.environ, "POLYFT_WORKER": "1"})
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}); see the log in {run_dir}")
    return json.loads(result.read_text())


def _worker(conf_file: str, result_file: str, work_dir: str, out_dir: str, init: str) -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(conf_file))
    summary = training.train(cfg, train_plan(cfg).model_path, Path(work_dir), Path(out_dir),
                             Path(result_file).parent, init or None)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
