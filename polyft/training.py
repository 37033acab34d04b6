"""Supervised fine-tuning through TRL's SFTTrainer: full, LoRA, QLoRA 4/8-bit, FLix.

The library below `polyft train` (polyft.commands.train): build the model to train, its
TrainingArguments, the trainer, then `train` writes the product into a directory it is
given (the artifact store's temporary build directory). torch, transformers, peft and trl
load inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from polyft import console
from polyft.adapters import flix
from polyft.data.formatting import tokenized_dataset
from polyft.data.mixture import load_mixture
from polyft.models.gguf import source_of
from polyft.models.load import is_offline, load_base, load_tokenizer
from polyft.runs import disk_full, no_space, read_manifest, size_of


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
        save_total_limit=t.save_total_limit,  # the oldest checkpoints go; resume reads the newest
        logging_steps=t.logging_steps,
        activation_checkpointing=t.gradient_checkpointing, bf16=bf16, fp16=fp16,
        seed=cfg.seed, data_seed=cfg.seed, report_to=_report_to(cfg, run_dir),
        max_length=cfg.data.max_length, packing=cfg.data.packing, completion_only_loss=True,
        dataset_num_proc=None, use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if distributed else None),
        ddp_find_unused_parameters=False if distributed else None,
        save_only_model=False, disable_tqdm=False, run_name=run_dir.name, **extra)


def lora_alpha(adapter) -> float:
    """The LoRA alpha used: adapter.alpha_ratio * r when the ratio is set, else adapter.alpha."""
    ratio = adapter.get("alpha_ratio")
    return float(ratio) * int(adapter.r) if ratio is not None else float(adapter.alpha)


def lora_config(adapter_cfg):
    from peft import LoraConfig

    targets = list(adapter_cfg.target_modules)
    return LoraConfig(
        r=adapter_cfg.r, lora_alpha=lora_alpha(adapter_cfg), lora_dropout=adapter_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=adapter_cfg.rslora, use_dora=adapter_cfg.dora, task_type="CAUSAL_LM")


def flix_config(cfg, rows: list[dict], model_path: str):
    a = cfg.adapter
    features = list(a.features)
    alpha = OmegaConf.to_container(a.alpha) if OmegaConf.is_config(a.alpha) else dict.fromkeys(features, a.alpha)
    return flix.FlixConfig(values=flix.feature_values(rows, features), ranks={t: int(a.ranks[t]) for t in features},
                      alpha={t: float(alpha[t]) for t in features}, features=features,
                      feature_dropout=float(a.feature_dropout), target_modules=list(a.target_modules),
                      dropout=float(a.dropout), base_model_name_or_path=model_path)


def build_model(cfg, model_path: str, rows: list[dict] | None = None, init_dir: str | None = None):
    """The model to train: the base (quantised if asked), with FLix layers or, continuing an
    adapter, that adapter (`init_dir`); for a new LoRA, the peft config SFTTrainer applies."""
    model = load_base(model_path, cfg.model, cfg.quant, allow_pickle=cfg.allow_pickle)
    if cfg.adapter.type == "full":
        return model, None
    if cfg.quant.bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.adapter.type == "flix":
        flix.inject(model, flix_config(cfg, rows, model_path))
        if init_dir:
            flix.load_weights(model, *flix.read(init_dir, "adapter.init_from"))
        return model, None
    if init_dir:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, init_dir, is_trainable=True), None
    return model, lora_config(cfg.adapter)


def flix_trainer(model, args, dataset, tokenizer):
    """SFTTrainer for a FLix model: the feature columns travel with each batch (the collator
    turns them into `flix_features`, which the model's pre-hook routes on)."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args.remove_unused_columns = False  # keep lang/task for the collator
    collator = flix.FeatureCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
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


def train_langs(rows: list[dict], init_dir: str | None) -> list[str] | None:
    """The languages of the rows trained on, and of those the continued adapter (init_dir)
    was trained on: its scores there are not zero-shot. None when the latter are unknown."""
    langs = {r["lang"] for r in rows}
    if init_dir:
        before = (read_manifest(init_dir) or {}).get("train_langs")
        if before is None:
            return None
        langs |= set(before)
    return sorted(langs)


def complete(checkpoint: Path) -> bool:
    """The trainer writes trainer_state.json last: a checkpoint whose state file reads back
    was written whole (a killed or full-disk save leaves none, or a truncated one)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(work_dir: Path) -> str | None:
    ckpts = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    done = [c for c in ckpts if complete(c)]
    return str(done[-1]) if done else None


def _train_or_free(trainer, work_dir: Path, resume: str | None):
    """trainer.train; when the disk fills while a checkpoint is saved, the half-written
    checkpoint goes (the complete ones stay for the next run) and one line says so."""
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:
        for cb in trainer.callback_handler.callbacks:  # their bars close into the run's log, not after the error line
            for bar in (getattr(cb, "training_bar", None), getattr(cb, "bar", None)):
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
        if not no_space(exc, work_dir):
            raise
        half = [c for c in work_dir.glob("checkpoint-*") if not complete(c)]
        written = sum(size_of(c) for c in half)
        for c in half:
            shutil.rmtree(c, ignore_errors=True)
        raise disk_full("the checkpoint", half[0] if half else work_dir, written) from None


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

    base = load_base(model_path, cfg.model, None, allow_pickle=cfg.allow_pickle)
    merged = PeftModel.from_pretrained(base.to(torch.bfloat16), str(product_dir)).merge_and_unload()
    out = product_dir / "merged"
    merged.save_pretrained(out, safe_serialization=True)
    return out


def train(cfg, model_path: str, work_dir: Path, out_dir: Path, run_dir: Path, init_dir: str | None = None) -> dict:
    """Train (resuming from the last checkpoint in `work_dir`) and, on the main process, write
    the product into `out_dir`. Returns a summary; its "manifest" entries describe the product."""
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(cfg.seed)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    rows = load_mixture(cfg.data, is_offline(cfg.offline))
    dataset, data_key = tokenized_dataset(rows, tokenizer, cfg.output_root, cfg.model.chat_template, model_path)
    model, peft_config = build_model(cfg, model_path, rows, init_dir)
    args = sft_config(cfg, work_dir, run_dir, distributed)
    if cfg.adapter.type == "flix":
        trainer = flix_trainer(model, args, dataset, tokenizer)
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.remove_columns(["lang", "task"]),
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[console.train_bar()])
    resume = last_checkpoint(work_dir)
    result = _train_or_free(trainer, work_dir, resume)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    trainable = sum(prm.numel() for prm in trainer.model.parameters() if prm.requires_grad)
    summary = {"resumed_from": resume, "history": losses, "data_key": data_key, "trainable_params": trainable,
               "examples": len(dataset), "world_size": trainer.args.world_size,
               "train_runtime_s": result.metrics.get("train_runtime"),
               "steps_per_second": result.metrics.get("train_steps_per_second"),
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if not trainer.is_world_process_zero():
        return summary
    summary["train_langs"] = train_langs(rows, init_dir if cfg.adapter.type != "full" else None)
    if cfg.adapter.type == "flix":
        summary["flix_values"] = model.flix_config.values
        flix.save(trainer.model, out_dir)
    else:
        if cfg.adapter.type == "lora" and not init_dir:  # a continued LoRA keeps its own alpha
            summary["lora_alpha"] = lora_alpha(cfg.adapter)
        if cfg.adapter.match:
            summary["matched_rank"] = {"r": cfg.adapter.r, "expert": cfg.adapter.match}
        trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _fix_adapter_base(out_dir, model_path)
    if cfg.merge_back and cfg.adapter.type != "full":
        summary["merged"] = str(merge_back(out_dir, model_path, cfg).relative_to(out_dir))
    summary["manifest"] = dict(base_model=model_path, base_source=source_of(model_path), adapter=cfg.adapter.type,
                               quant=cfg.quant.name, chat_template=cfg.model.chat_template,
                               train_langs=summary["train_langs"], final_loss=losses[-1]["loss"] if losses else None, steps=trainer.state.global_step)
    return summary
