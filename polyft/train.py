"""`polyft train`: supervised fine-tuning (full, LoRA, QLoRA 4/8-bit) through TRL.

Reads top to bottom: resolve the base model, find or build the product in the artifact
store (skip if it exists), load the tokenized mixture (cached), load the base (quantised
if asked), wrap it with LoRA, train with TRL's SFTTrainer (resuming from the last
checkpoint of an interrupted run), save the product atomically, optionally merge back.
Several processes: the command re-launches itself under torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from polyft import console
from polyft.errors import ConfigError, MissingArtifactError, PolyftError
from polyft.models.load import (builds_tiny, check_model_dir, is_offline,
                                resolve_model_path, safetensors_names)
from polyft.runs import ArtifactStore, config_hash, read_manifest

# Module names of the tiny models (they are Llama/Mistral layouts), checked without torch.
TINY_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LOG_ONLY = ("logging_steps", "name")


@dataclass
class Plan:
    model_path: str
    kind: str  # adapter | model
    name: str
    key: dict
    store: ArtifactStore
    target: Path | None


def product_name(cfg) -> str:
    if cfg.get("expert"):
        return str(cfg.expert)
    quant = f"-{cfg.quant.name}" if cfg.quant.bits else ""
    return f"{cfg.model.name}-{cfg.adapter.type}{quant}"


def product_key(cfg, model_path: str) -> dict:
    """The part of the config that determines the trained weights (not logging, not paths)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["resolved"] = None if builds_tiny(cfg.model) else model_path
    if model.get("chat_template") == "model":  # the default: product hashes stay as they were
        del model["chat_template"]
    key = {"model": model, "quant": OmegaConf.to_container(cfg.quant, resolve=True),
           "data": OmegaConf.to_container(cfg.data, resolve=True),
           "train": {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                     if k not in _LOG_ONLY},
           "seed": cfg.seed, "merge_back": cfg.merge_back}
    key["adapter"] = adapter_key(cfg.adapter)
    return key


FLIX_ONLY = ("features", "ranks", "feature_dropout")
LORA_ONLY = ("r", "rslora", "dora", "match")


def adapter_key(adapter) -> dict:
    """The adapter settings that shape the weights: only those of its type (a LoRA's key is
    what it was before FLix existed; match is already folded into r and alpha)."""
    if adapter.type == "full":
        return {"type": "full"}
    a = OmegaConf.to_container(adapter, resolve=True)
    if a["type"] == "flix":
        return {k: v for k, v in a.items() if k not in LORA_ONLY + ("alpha_ratio",)}
    a = {k: v for k, v in a.items() if k not in FLIX_ONLY + ("match", "alpha_ratio")}
    # the alpha the weights are trained with, however it was given: a ratio at r=64 and the
    # same alpha given as a number are one product, and keys made before the ratio stay valid
    a["alpha"] = lora_alpha(adapter)
    return a


def lora_alpha(adapter) -> float:
    """The LoRA alpha used: adapter.alpha_ratio * r when the ratio is set, else adapter.alpha."""
    ratio = adapter.get("alpha_ratio")
    return float(ratio) * int(adapter.r) if ratio is not None else float(adapter.alpha)


def plan(cfg, build_model: bool = True) -> Plan:
    path = resolve_model_path(cfg.model, cfg.output_root, cfg.offline, build=build_model)
    kind = "model" if cfg.adapter.type == "full" else "adapter"
    target = Path(cfg.output_dir).resolve() if cfg.output_dir else None
    key = product_key(cfg, path)
    if cfg.adapter.init_from and kind == "adapter":
        key["adapter"]["init_from"] = init_identity(cfg)
    return Plan(path, kind, product_name(cfg), key, ArtifactStore(Path(cfg.output_root) / "artifacts"), target)


def flix_total_rank(cfg) -> int:
    """sum over feature types of r_t x (values of t in the training data): FLix's rank directions."""
    from polyft.adapters.flix import feature_values
    from polyft.data.mixture import load_mixture

    a = cfg.adapter
    values = feature_values(load_mixture(cfg.data, is_offline(cfg.offline)), list(a.features))
    return sum(int(a.ranks[t]) * len(values[t]) for t in a.features)


def init_identity(cfg) -> dict:
    """What a continued LoRA starts from: an expert (by its product hash) or an adapter dir."""
    ref = cfg.adapter.init_from
    if ref in cfg.experts:
        from polyft.experiment import expert_cfg

        return {"expert": ref, "hash": config_hash(plan(expert_cfg(cfg, ref), build_model=False).key)}
    m = read_manifest(ref) or {}
    return {"path": str(Path(ref).resolve()), "hash": m.get("hash")}


def init_dir(cfg) -> str:
    ref = cfg.adapter.init_from
    return str(expert_product(cfg, ref)) if ref in cfg.experts else ref


def expert_product(cfg, name: str) -> Path:
    """The trained product of expert `name` of the experiment `cfg`, or one line saying how to make it."""
    from polyft.experiment import expert_cfg

    found = existing_product(plan(expert_cfg(cfg, name)))
    if found is None:
        raise MissingArtifactError(f"expert '{name}' is not trained yet; run: polyft train "
                                   f"+exp={cfg.exp_name or 'EXP'} expert={name}")
    return found


def existing_product(p: Plan) -> Path | None:
    if p.target is not None:
        m = read_manifest(p.target)
        return p.target if m and m.get("hash") == config_hash(p.key) else None
    return p.store.find(p.kind, p.name, p.key)


# ---------------------------------------------------------------- checks (no torch)

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


def check(cfg) -> None:
    """Everything that can be refused before a directory is made (each expert, if any)."""
    if cfg.experts:
        from polyft.config import validate
        from polyft.experiment import expert_cfg

        for name in ([cfg.expert] if cfg.expert else list(cfg.experts)):
            ecfg = expert_cfg(cfg, name)
            validate(ecfg)
            check_one(ecfg)
        return
    check_one(cfg)


def check_one(cfg) -> None:
    if cfg.adapter.type == "lora" and cfg.adapter.match and cfg.adapter.match not in cfg.experts:
        raise ConfigError(f"adapter.match={cfg.adapter.match}: not an expert of this experiment; match names "
                          "an expert with adapter=flix")
    if cfg.adapter.type == "full" and cfg.quant.bits:
        raise ConfigError(f"quant={cfg.quant.name} needs an adapter; full fine-tuning of a "
                          "quantised base is not possible (use adapter=lora)")
    p = plan(cfg, build_model=False)
    if not builds_tiny(cfg.model):
        check_model_dir(p.model_path, "model.path", cfg.allow_pickle)
    _check_targets(cfg, p.model_path)
    init = cfg.adapter.init_from
    init_file = "flix_config.json" if cfg.adapter.type == "flix" else "adapter_config.json"
    if init and init not in cfg.experts and not (Path(init) / init_file).is_file():
        raise PolyftError(f"adapter.init_from={init}: not an adapter directory (no {init_file}) "
                          f"nor an expert of this experiment")
    if p.target is not None and p.target.exists() and any(p.target.iterdir()) and existing_product(p) is None:
        raise PolyftError(f"output_dir={p.target} exists and holds something else; remove it or "
                          "choose another path")
    from polyft.data.formatting import check_chat_template
    from polyft.data.mixture import load_mixture

    rows = load_mixture(cfg.data, is_offline(cfg.offline))
    if any(r["prompt"] for r in rows):  # prompt/response rows are rendered as chat turns
        check_chat_template(p.model_path, cfg.model.chat_template)
    if cfg.adapter.type == "flix":
        check_flix_sources(cfg)


def check_flix_sources(cfg) -> None:
    """Every source gives each of its rows a value for every FLix feature."""
    from polyft.data.sources import load_source

    for name, src in cfg.data.sources.items():
        rows = load_source(f"data.sources.{name}", src, cfg.data.seed, is_offline(cfg.offline))
        for ftype in cfg.adapter.features:
            if any(not r.get(ftype) for r in rows):
                raise PolyftError(f"data.sources.{name}: rows without a {ftype} value, which adapter=flix "
                                  f"needs; set data.sources.{name}.features.{ftype}=VALUE")


# ---------------------------------------------------------------- training

def _report_to(cfg, run_dir: Path) -> list[str]:
    if cfg.logger.name == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
        os.environ.setdefault("WANDB_SILENT", "true")
        return ["wandb"]
    if cfg.logger.name == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
        return ["tensorboard"]
    return []


def _precision(cfg) -> tuple[bool, bool]:
    import torch

    want = cfg.train.precision
    if want == "auto":
        want = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return want == "bf16", want == "fp16"


def sft_config(cfg, work_dir: Path, run_dir: Path, distributed: bool):
    import torch
    from trl import SFTConfig

    bf16, fp16 = _precision(cfg)
    t = cfg.train
    extra = {}
    if distributed and t.distributed == "fsdp":
        extra["fsdp"] = "full_shard auto_wrap"
    if distributed and t.distributed == "deepspeed":
        extra["deepspeed"] = t.deepspeed_config
    return SFTConfig(
        output_dir=str(work_dir), max_steps=t.max_steps, num_train_epochs=t.epochs,
        learning_rate=t.lr, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, optim=t.optimizer,
        max_grad_norm=t.max_grad_norm, save_steps=t.save_steps, save_strategy="steps",
        logging_steps=t.logging_steps,
        activation_checkpointing=t.gradient_checkpointing, bf16=bf16, fp16=fp16,
        seed=cfg.seed, data_seed=cfg.seed, report_to=_report_to(cfg, run_dir),
        max_length=cfg.data.max_length, packing=cfg.data.packing, completion_only_loss=True,
        dataset_num_proc=None, use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if distributed else None),
        ddp_find_unused_parameters=False if distributed else None,
        save_only_model=False, disable_tqdm=False, run_name=run_dir.name, **extra)


def lora_config(adapter_cfg):
    from peft import LoraConfig

    targets = list(adapter_cfg.target_modules)
    return LoraConfig(
        r=adapter_cfg.r, lora_alpha=lora_alpha(adapter_cfg), lora_dropout=adapter_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=adapter_cfg.rslora, use_dora=adapter_cfg.dora, task_type="CAUSAL_LM")


def flix_config(cfg, rows: list[dict], model_path: str):
    from polyft.adapters.flix import FlixConfig, feature_values

    a = cfg.adapter
    features = list(a.features)
    alpha = OmegaConf.to_container(a.alpha) if OmegaConf.is_config(a.alpha) else dict.fromkeys(features, a.alpha)
    return FlixConfig(values=feature_values(rows, features), ranks={t: int(a.ranks[t]) for t in features},
                      alpha={t: float(alpha[t]) for t in features}, features=features,
                      feature_dropout=float(a.feature_dropout), target_modules=list(a.target_modules),
                      dropout=float(a.dropout), base_model_name_or_path=model_path)


def build_model(cfg, model_path: str, rows: list[dict] | None = None):
    from polyft.models.load import load_base

    model = load_base(model_path, cfg.model, cfg.quant, allow_pickle=cfg.allow_pickle)
    if cfg.adapter.type == "full":
        return model, None
    if cfg.quant.bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.adapter.type == "flix":
        from polyft.adapters import flix

        flix.inject(model, flix_config(cfg, rows, model_path))
        if cfg.adapter.init_from:
            flix.load_weights(model, *flix.read(init_dir(cfg), "adapter.init_from"))
        return model, None
    if cfg.adapter.init_from:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, init_dir(cfg), is_trainable=True), None
    return model, lora_config(cfg.adapter)


def flix_trainer(model, args, dataset, tokenizer):
    """SFTTrainer for a FLix model: the feature columns travel with each batch (the collator
    turns them into `flix_features`, which the model's pre-hook routes on)."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from polyft.adapters.flix import FeatureCollator

    args.remove_unused_columns = False  # keep lang/task for the collator
    collator = FeatureCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
                               model.flix_config)
    # transformers refuses to train a quantised model it sees no adapter on; FLix layers are
    # one, so say so during construction only (the flag also switches its own adapter code paths)
    quantised = getattr(model, "is_quantized", False)
    if quantised:
        model._hf_peft_config_loaded = True
    try:
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          data_collator=collator, callbacks=[console.train_bar()])
    finally:
        if quantised:
            model._hf_peft_config_loaded = False


def train_langs(cfg, rows: list[dict]) -> list[str] | None:
    """The languages of the rows trained on, and of those the continued adapter (init_from)
    was trained on: its scores there are not zero-shot. None when the latter are unknown."""
    langs = {r["lang"] for r in rows}
    if cfg.adapter.init_from and cfg.adapter.type != "full":
        before = (read_manifest(init_dir(cfg)) or {}).get("train_langs")
        if before is None:
            return None
        langs |= set(before)
    return sorted(langs)


def last_checkpoint(work_dir: Path) -> str | None:
    ckpts = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return str(complete[-1]) if complete else None


def _fix_adapter_base(product_dir: Path, model_path: str) -> None:
    """Name the real base (local path or hub id) so plain PeftModel.from_pretrained finds it."""
    f = product_dir / "adapter_config.json"
    if f.exists():
        conf = json.loads(f.read_text())
        conf["base_model_name_or_path"] = model_path
        f.write_text(json.dumps(conf, indent=2))


def merge_back(product_dir: Path, model_path: str, cfg) -> Path:
    """A 16-bit merged model beside the adapter; a quantised base is reloaded unquantised."""
    import torch
    from peft import PeftModel

    from polyft.models.load import load_base

    base = load_base(model_path, cfg.model, None, allow_pickle=cfg.allow_pickle)
    merged = PeftModel.from_pretrained(base.to(torch.bfloat16), str(product_dir)).merge_and_unload()
    out = product_dir / "merged"
    merged.save_pretrained(out, safe_serialization=True)
    return out


def train_and_save(cfg, p: Plan, run_dir: Path) -> dict:
    """Train (resuming if a checkpoint exists) and write the product. Returns a summary."""
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    from polyft.data.formatting import tokenized_dataset
    from polyft.data.mixture import load_mixture
    from polyft.models.gguf import source_of
    from polyft.models.load import load_tokenizer

    set_seed(cfg.seed)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    tokenizer = load_tokenizer(p.model_path, cfg.model.trust_remote_code, cfg.model.revision)
    rows = load_mixture(cfg.data, is_offline(cfg.offline))
    dataset, data_key = tokenized_dataset(rows, tokenizer, cfg.output_root, cfg.model.chat_template,
                                          p.model_path)
    model, peft_config = build_model(cfg, p.model_path, rows)
    work_dir = p.store.work_dir(p.kind, p.name, p.key)
    args = sft_config(cfg, work_dir, run_dir, distributed)
    if cfg.adapter.type == "flix":
        trainer = flix_trainer(model, args, dataset, tokenizer)
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.remove_columns(["lang", "task"]),
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[console.train_bar()])
    resume = last_checkpoint(work_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    trainable = sum(prm.numel() for prm in trainer.model.parameters() if prm.requires_grad)
    summary = {"resumed_from": resume, "history": losses, "data_key": data_key, "trainable_params": trainable,
               "examples": len(dataset), "world_size": trainer.args.world_size,
               "train_runtime_s": result.metrics.get("train_runtime"),
               "steps_per_second": result.metrics.get("train_steps_per_second"),
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if not trainer.is_world_process_zero():
        return summary
    summary["train_langs"] = train_langs(cfg, rows)  # the report marks the others zero-shot
    if cfg.adapter.type == "flix":
        summary["flix_values"] = model.flix_config.values
    else:
        if cfg.adapter.type == "lora" and not cfg.adapter.init_from:  # a continued LoRA keeps its own alpha
            summary["lora_alpha"] = lora_alpha(cfg.adapter)
        if cfg.adapter.match:
            summary["matched_rank"] = {"r": cfg.adapter.r, "expert": cfg.adapter.match}
    with p.store.build(p.kind, p.name, p.key, target=p.target) as b:
        if cfg.adapter.type == "flix":
            from polyft.adapters import flix

            flix.save(trainer.model, b.dir)
        else:
            trainer.model.save_pretrained(b.dir, safe_serialization=True)
        tokenizer.save_pretrained(b.dir)
        _fix_adapter_base(b.dir, p.model_path)
        if cfg.merge_back and p.kind == "adapter":
            summary["merged"] = str(merge_back(b.dir, p.model_path, cfg).relative_to(b.dir))
        b.manifest.update(base_model=p.model_path, base_source=source_of(p.model_path),
                          adapter=cfg.adapter.type, quant=cfg.quant.name, chat_template=cfg.model.chat_template,
                          train_langs=summary["train_langs"],
                          final_loss=losses[-1]["loss"] if losses else None, steps=trainer.state.global_step)
    summary["artifact"] = str(b.dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary


def relaunch(cfg, run_dir: Path) -> dict:
    """Run this module under torchrun with N processes; rank 0 writes the summary."""
    conf_file, result = run_dir / "train_config.yaml", run_dir / "train_result.json"
    OmegaConf.save(cfg, conf_file, resolve=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={cfg.train.num_processes}", "-m", "polyft.train", str(conf_file), str(result)]
    proc = subprocess.run(cmd, env={**os.environ, "POLYFT_WORKER": "1"})
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}); see the log in {run_dir}")
    return json.loads(result.read_text())


def command(cfg, record) -> None:
    """Train the configured model, or each expert of an experiment (`expert=NAME`: one)."""
    if cfg.experts:
        from polyft.experiment import expert_cfg

        for name in ([cfg.expert] if cfg.expert else list(cfg.experts)):
            train_one(expert_cfg(cfg, name), record)
        return
    train_one(cfg, record)


def train_one(cfg, record) -> None:
    from polyft.models.gguf import source_of

    p = plan(cfg)
    record.extra["product"] = {"kind": p.kind, "name": p.name, "hash": config_hash(p.key)}
    if cfg.adapter.type == "lora" and not cfg.adapter.init_from:  # the alpha used, also when it followed the rank
        record.extra["product"]["lora_alpha"] = p.key["adapter"]["alpha"]
    if source_of(p.model_path):  # a base converted from a GGUF file: which file, which bytes
        record.extra["model_source"] = source_of(p.model_path)
    with p.store.lock(p.kind, p.name, p.key):
        found = existing_product(p)
        if found is not None:
            record.add_artifact(p.kind, found, reused=True, name=p.name)
            console.echo(f"polyft: {p.kind} {p.name} already trained: {found}")
            return
        since = console.started(f"training {p.kind} {p.name}")
        if cfg.train.num_processes > 1 and "LOCAL_RANK" not in os.environ:
            summary = relaunch(cfg, record.run_dir)
        else:
            summary = train_and_save(cfg, p, record.run_dir)
    history = summary.pop("history")
    if cfg.command == "train" and not cfg.experts:  # a single training: the run's own history
        record.history = history
        record.metrics.update(final_loss=history[-1]["loss"] if history else None,
                              first_loss=history[0]["loss"] if history else None)
        record.extra["train"] = summary
    else:  # one of an experiment's experts
        record.extra.setdefault("trained", {})[p.name] = {**summary, "history": history}
    record.add_artifact(p.kind, summary["artifact"], reused=False, name=p.name)
    console.done(since, f"{p.kind} {p.name} written to {summary['artifact']}")


def _worker(conf_file: str, result_file: str) -> None:
    from polyft.config import RootConfig

    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(conf_file))
    summary = train_and_save(cfg, plan(cfg), Path(result_file).parent)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
