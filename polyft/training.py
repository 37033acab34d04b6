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

from polyft import console, sharding, tracking
from polyft.adapters import flix
from polyft.data.formatting import tokenized_dataset
from polyft.data.mixture import load_splits
from polyft.errors import PolyftError
from polyft.models.gguf import source_of
from polyft.models.load import is_offline, load_base, load_tokenizer, torch_dtype
from polyft.runs import base_reference, disk_full, no_space, read_manifest, size_of


def _precision(cfg) -> tuple[bool, bool]:
    import torch

    want = cfg.train.precision
    if want == "auto":
        want = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return want == "bf16", want == "fp16"


def logging_steps(t) -> int:
    """train.logging_steps, but never more than the steps there are: a short run logs too."""
    return min(t.logging_steps, t.max_steps) if t.max_steps > 0 else t.logging_steps


def sft_config(cfg, work_dir: Path, report_to: list[str], run_name: str, distributed: bool,
               validate: bool = False):
    import torch
    from trl import SFTConfig

    bf16, fp16 = _precision(cfg)
    t = cfg.train
    extra = {}
    checkpointing = t.gradient_checkpointing
    if distributed and t.distributed == "fsdp":
        extra["fsdp"] = True
        extra["fsdp_config"] = sharding.fsdp_config(t, torch.cuda.is_available())
        checkpointing = False  # FSDP checkpoints its own units (train.fsdp.activation_checkpointing)
    if distributed and t.distributed == "deepspeed":
        extra["deepspeed"] = str(sharding.deepspeed_file(t.deepspeed_config))
    if validate:  # eval loss on the held-out rows every eval_steps (and after the last step)
        extra.update(eval_strategy="steps", eval_steps=t.get("eval_steps") or t.logging_steps,
                     per_device_eval_batch_size=t.batch_size)
    return SFTConfig(
        output_dir=str(work_dir), max_steps=t.max_steps, num_train_epochs=t.epochs,
        learning_rate=t.lr, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, optim=t.optimizer,
        max_grad_norm=t.max_grad_norm, save_steps=t.save_steps, save_strategy="steps",
        save_total_limit=t.save_total_limit,  # the oldest checkpoints go; resume reads the newest
        logging_steps=logging_steps(t), logging_first_step=True,
        activation_checkpointing=checkpointing, bf16=bf16, fp16=fp16,
        seed=cfg.seed, data_seed=cfg.seed, report_to=report_to,
        max_length=cfg.data.max_length, packing=cfg.data.packing, completion_only_loss=True,
        dataset_num_proc=None, use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if distributed else None),
        ddp_find_unused_parameters=False if distributed else None,
        save_only_model=False, disable_tqdm=False, run_name=run_name, **extra)


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
    quant, dtype, device_map = cfg.quant, None, None
    if cfg.quant.bits:
        import torch

        on_gpu = torch.cuda.is_available()
        device_map = sharding.quant_device_map(cfg, on_gpu)
        storage = sharding.quant_storage(cfg, str(torch_dtype(cfg.model.dtype, on_gpu)).removeprefix("torch."))
        quant = OmegaConf.merge(cfg.quant, {"quant_storage": storage if cfg.quant.bits == 4 else None})
        if storage != "uint8":  # a sharded unit's packed and plain weights share one dtype
            dtype = storage
    model = load_base(model_path, cfg.model, quant, allow_pickle=cfg.allow_pickle, device_map=device_map,
                      dtype=dtype)
    if cfg.adapter.type == "full":
        return model, None
    if cfg.quant.bits and sharding.sharded(cfg) != "fsdp":  # its fp32 norms would mix dtypes in a FSDP unit
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


def flix_trainer(model, args, dataset, tokenizer, callbacks: list, eval_dataset=None, trainer_cls=None):
    """SFTTrainer (or `trainer_cls`, a subclass) for a FLix model: the feature columns travel
    with each batch (the collator turns them into `flix_features`, which the model's pre-hook
    routes on)."""
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
        return (trainer_cls or SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           eval_dataset=eval_dataset, data_collator=collator, callbacks=callbacks)
    finally:
        if quantised:
            model._hf_peft_config_loaded = False


def log_last_step():
    """A TrainerCallback that logs the last step too (the trainer logs every logging_steps
    only): the loss a run ends with is the last one logged, and run.json's final_loss."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


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


def eval_history(trainer) -> list[dict]:
    """[{step, eval_loss}] of the run, the last one after the final step (evaluated now when
    the step count is no multiple of eval_steps)."""
    def logged():
        return [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in trainer.state.log_history
                if "eval_loss" in h]

    if not logged() or logged()[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    return logged()


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


def _fix_adapter_base(product_dir: Path, model_path: str, output_root: str) -> None:
    """Name the real base (local path or hub id) so plain PeftModel.from_pretrained finds it;
    relative to the adapter when both are in the output tree (polyft.runs.base_reference)."""
    ref = base_reference(product_dir, model_path, output_root)
    for name in ("adapter_config.json", flix.CONFIG_FILE):
        f = product_dir / name
        if f.exists():
            conf = json.loads(f.read_text())
            conf["base_model_name_or_path"] = ref
            f.write_text(json.dumps(conf, indent=2, sort_keys=name == flix.CONFIG_FILE))


def merge_back(product_dir: Path, model_path: str, cfg) -> Path:
    """A bf16 merged model beside the adapter, streamed by the merge engine as `polyft merge`
    is: the base's tensors are read one at a time from its files (unquantised, whatever was
    trained on), the LoRA folded into each adapted one in fp32 (peft's merge_and_unload
    arithmetic), the others copied file to file; memory follows the largest tensor, not the
    model. An adapter the engine cannot fold (a LoRA on embeddings, LoRA biases) goes through
    peft with the whole base in memory, as before."""
    from polyft.merge import io
    from polyft.merge.engine import MergeSpec, merge_models
    from polyft.models.load import hub_cached

    out = product_dir / "merged"
    base = model_path if Path(model_path).exists() else hub_cached(model_path, cfg.model.revision)
    try:
        io.open_checkpoint(product_dir, base, cfg.allow_pickle)
    except PolyftError:
        return _merge_back_peft(product_dir, model_path, cfg, out)
    out.mkdir()
    merge_models(MergeSpec("linear", [product_dir], params={"weights": [1.0]}, dtype="bfloat16",
                           adapter_bases={str(product_dir): str(base)}, allow_pickle=cfg.allow_pickle), out)
    return out


def _merge_back_peft(product_dir: Path, model_path: str, cfg, out: Path) -> Path:
    import torch
    from peft import PeftModel

    base = load_base(model_path, cfg.model, None, allow_pickle=cfg.allow_pickle)
    merged = PeftModel.from_pretrained(base.to(torch.bfloat16), str(product_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    return out


def train(cfg, model_path: str, work_dir: Path, out_dir: Path, run_dir: Path, init_dir: str | None = None,
          tracked: tracking.Tracked | None = None) -> dict:
    """Train (resuming from the last checkpoint in `work_dir`) and, on the main process, write
    the product into `out_dir`. Returns a summary; its "manifest" entries describe the product.
    `tracked`: the W&B / TensorBoard run of this training (logger=wandb|tensorboard)."""
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(cfg.seed)
    distributed = sharding.world_size() > 1
    main_process = int(os.environ.get("RANK", "0")) == 0
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    rows, validation = load_splits(cfg.data, is_offline(cfg.offline))
    dataset, data_key = tokenized_dataset(rows, tokenizer, cfg.output_root, cfg.model.chat_template, model_path)
    held = tokenized_dataset(validation, tokenizer, cfg.output_root, cfg.model.chat_template,
                             model_path)[0] if validation else None
    with tracking.training(cfg.logger, run_dir, tracked, main_process) as hooks:
        # the arguments first: they start the process group, which FSDP's low-memory loading reads
        args = sft_config(cfg, work_dir, hooks.report_to, tracked.name if tracked else run_dir.name, distributed,
                          validate=held is not None)
        if distributed and cfg.train.distributed == "fsdp":
            os.environ["ACCELERATE_USE_FSDP"] = "true"
        model, peft_config = build_model(cfg, model_path, rows, init_dir)
        Trainer = sharding.trainer_class(SFTTrainer) if args.fsdp else SFTTrainer
        callbacks = [console.train_bar(), log_last_step(), *hooks.callbacks]
        if cfg.adapter.type == "flix":
            trainer = flix_trainer(model, args, dataset, tokenizer, callbacks, held, Trainer)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=dataset.remove_columns(["lang", "task"]),
                              eval_dataset=held.remove_columns(["lang", "task"]) if held is not None else None,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
        resume = last_checkpoint(work_dir)
        result = _train_or_free(trainer, work_dir, resume)
        evals = eval_history(trainer) if held is not None else None
        losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
        if losses:
            hooks.summary.update(final_loss=losses[-1]["loss"], first_loss=losses[0]["loss"])
    trainable = sum(getattr(prm, "ds_numel", None) or prm.numel()
                    for prm in trainer.model.parameters() if prm.requires_grad)
    a = trainer.args
    summary = {"resumed_from": resume, "history": losses, "data_key": data_key, "trainable_params": trainable,
               "examples": len(dataset), "world_size": a.world_size,
               "batch_per_device": a.per_device_train_batch_size,
               "global_batch": a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps,
               "train_runtime_s": result.metrics.get("train_runtime"),
               "steps_per_second": result.metrics.get("train_steps_per_second"),
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if hooks.info:  # where the tracked run is (run.json, the console)
        summary["tracking"] = hooks.info
    if evals is not None:
        summary.update(eval_history=evals, validation_examples=len(held))
    if distributed:
        summary["distributed"] = {"mode": cfg.train.distributed, **sharding.layout(trainer)}
    # every rank: a sharded model is gathered through collectives before rank 0 writes
    flix_save = (lambda state: flix.save(model, out_dir, state)) if cfg.adapter.type == "flix" else None
    sharding.save_trained(trainer, out_dir, flix_save)
    if not trainer.is_world_process_zero():
        return summary
    summary["train_langs"] = train_langs(rows, init_dir if cfg.adapter.type != "full" else None)
    if cfg.adapter.type == "flix":
        summary["flix_values"] = model.flix_config.values
    else:
        if cfg.adapter.type == "lora" and not init_dir:  # a continued LoRA keeps its own alpha
            summary["lora_alpha"] = lora_alpha(cfg.adapter)
        if cfg.adapter.match:
            summary["matched_rank"] = {"r": cfg.adapter.r, "expert": cfg.adapter.match}
    tokenizer.save_pretrained(out_dir)
    _fix_adapter_base(out_dir, model_path, cfg.output_root)
    if cfg.merge_back and cfg.adapter.type != "full":
        summary["merged"] = str(merge_back(out_dir, model_path, cfg).relative_to(out_dir))
    summary["manifest"] = dict(base_model=model_path, base_source=source_of(model_path), adapter=cfg.adapter.type,
                               quant=cfg.quant.name, chat_template=cfg.model.chat_template,
                               train_langs=summary["train_langs"], final_loss=losses[-1]["loss"] if losses else None, steps=trainer.state.global_step)
    if evals:
        summary["manifest"]["eval_loss"] = evals[-1]["eval_loss"]
    return summary
