"""Several processes: FSDP and DeepSpeed ZeRO settings for the trainer, and saving what they shard.

`train.distributed` picks DDP, FSDP (torch's FSDP2, through accelerate) or DeepSpeed ZeRO when
`train.num_processes` > 1. This module turns the config into what transformers' Trainer takes
(`fsdp_config`, a DeepSpeed JSON file), reads and checks a DeepSpeed file in one line, places a
4-bit base per process, and saves the trained model on every rank so that sharded weights are
gathered before rank 0 writes them. torch, transformers and accelerate load inside functions.

`train.batch_size` is per process: the global batch is batch x processes x accumulation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from polyft.errors import PolyftError

# The DeepSpeed configs polyft ships, by name (train.deepspeed_config=zero3)
DEEPSPEED_DIR = Path(__file__).resolve().parent / "conf" / "deepspeed"
STATE_DICT_TYPES = {"full": "FULL_STATE_DICT", "sharded": "SHARDED_STATE_DICT"}
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def global_batch(train_cfg, processes: int) -> int:
    return int(train_cfg.batch_size) * int(processes) * int(train_cfg.grad_accum)


def sharded(cfg) -> str | None:
    """fsdp or deepspeed when this run shards over several processes, else None (DDP or one process)."""
    t = cfg.train
    return t.distributed if t.num_processes > 1 and t.distributed in ("fsdp", "deepspeed") else None


# ---------------------------------------------------------------- DeepSpeed files

def deepspeed_names() -> list[str]:
    return sorted(f.stem for f in DEEPSPEED_DIR.glob("*.json"))


def deepspeed_file(ref: str) -> Path:
    """A shipped config's file (by name) or the path given."""
    shipped = DEEPSPEED_DIR / f"{ref}.json"
    if "/" not in ref and not ref.endswith(".json") and shipped.is_file():
        return shipped
    return Path(ref).expanduser()


def read_deepspeed(ref: str, key: str = "train.deepspeed_config") -> dict:
    """The DeepSpeed config named or pointed at by `ref`, or one line saying what is wrong with it."""
    names = ", ".join(deepspeed_names())
    f = deepspeed_file(ref)
    if not f.is_file():
        raise PolyftError(f"{key}={ref}: no such file; give a DeepSpeed JSON file or a shipped config: {names}")
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolyftError(f"{key}={ref}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise PolyftError(f"{key}={ref}: not a text file; a DeepSpeed config is JSON") from None
    except json.JSONDecodeError as e:
        raise PolyftError(f"{key}={ref}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    stage = conf.get("zero_optimization", {}).get("stage") if isinstance(conf, dict) else None
    if not isinstance(conf, dict) or not isinstance(conf.get("zero_optimization"), dict):
        raise PolyftError(f"{key}={ref}: no zero_optimization section; polyft runs DeepSpeed ZeRO (stage 1, 2 or 3)")
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise PolyftError(f"{key}={ref}: zero_optimization.stage={stage} is not allowed; use 0, 1, 2 or 3")
    return conf


def zero_stage(conf: dict) -> int:
    return int(conf["zero_optimization"]["stage"])


def zero_offload(conf: dict) -> dict[str, bool]:
    """Which ZeRO states live in host memory: {"optimizer": bool, "param": bool}."""
    z = conf["zero_optimization"]
    return {part: (z.get(f"offload_{part}") or {}).get("device", "none") in ("cpu", "nvme")
            for part in ("optimizer", "param")}


def preflight(cfg) -> None:
    """What the files and the machine say about a sharded run, before anything is written."""
    t = cfg.train
    if t.distributed != "deepspeed":
        return
    read_deepspeed(t.deepspeed_config)
    if t.num_processes > 1:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise PolyftError("train.distributed=deepspeed needs the deepspeed package: "
                              "pip install 'polyft[deepspeed]'")
        import torch

        if not torch.cuda.is_available():
            raise PolyftError("train.distributed=deepspeed needs GPUs (accelerate starts DeepSpeed on accelerators "
                              "only); on CPU use train.distributed=fsdp or ddp")


# ---------------------------------------------------------------- FSDP

def fsdp_activation_checkpointing(train_cfg) -> bool:
    """FSDP's own activation checkpointing; null follows train.gradient_checkpointing."""
    a = train_cfg.fsdp.activation_checkpointing
    return bool(train_cfg.gradient_checkpointing) if a is None else bool(a)


def fsdp_config(train_cfg, on_gpu: bool) -> dict:
    """transformers' TrainingArguments.fsdp_config for train.fsdp (FSDP2). Without a
    wrap_layer_cls accelerate wraps the model's own decoder layers (its _no_split_modules).
    Offload moves shards from an accelerator to host memory; on a CPU run they are there already."""
    f = train_cfg.fsdp
    conf = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": bool(f.reshard_after_forward),
            "cpu_offload": bool(f.cpu_offload) and on_gpu,
            "cpu_ram_efficient_loading": bool(f.cpu_ram_efficient_loading),
            "state_dict_type": STATE_DICT_TYPES[f.state_dict_type],
            "activation_checkpointing": fsdp_activation_checkpointing(train_cfg)}
    if f.wrap_layer_cls:
        conf["transformer_layer_cls_to_wrap"] = list(f.wrap_layer_cls)
    return conf


def trainer_class(base):
    """`base` (a transformers Trainer class), sharding with FSDP on CPU processes too.

    accelerate enables FSDP only on accelerators: on CPU it would quietly train the processes
    as DDP, each holding a whole copy. The subclass switches its state to FSDP after the
    accelerator is made (accelerate's FSDP2 path then runs torch's fully_shard on gloo)."""
    import torch

    if torch.cuda.is_available():
        return base

    class CpuSharded(base):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                from accelerate.state import AcceleratorState, PartialState
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                # Both shared states: each new AcceleratorState() copies PartialState's type
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
                AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                    **self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    CpuSharded.__name__ = base.__name__
    return CpuSharded


def layout(trainer) -> dict:
    """How the trained model was laid out over the processes, as this rank sees it: the
    modules FSDP made units of, and the parameters this rank holds against the whole model."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model = trainer.model
    total = local = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if isinstance(p, DTensor):
            local += p.to_local().numel()
        elif hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
            local += p.ds_tensor.numel()
        else:
            local += p.numel()
    units: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, FSDPModule) and m is not model:
            name = type(m).__name__.removeprefix("FSDP")
            units[name] = units.get(name, 0) + 1
    out = {"params_total": total, "params_this_rank": local}
    if units:
        out["fsdp_units"] = units
    return out


# ---------------------------------------------------------------- QLoRA on several processes

def shards_weights(cfg) -> bool:
    """FSDP, or DeepSpeed ZeRO-3: the weights themselves are split over the processes."""
    mode = sharded(cfg)
    return mode == "fsdp" or (mode == "deepspeed" and zero_stage(read_deepspeed(cfg.train.deepspeed_config)) == 3)


def quant_storage(cfg, load_dtype: str) -> str:
    """The dtype bitsandbytes packs 4-bit weights into: quant.quant_storage, or when null, the
    dtype the model loads in when FSDP or ZeRO-3 shard the weights (they shard float tensors,
    one dtype per unit: the QLoRA-FSDP recipe), else bitsandbytes' own uint8."""
    if cfg.quant.get("quant_storage"):
        return cfg.quant.quant_storage
    return load_dtype if cfg.quant.bits == 4 and shards_weights(cfg) else "uint8"


def quant_device_map(cfg, on_gpu: bool) -> dict | None:
    """Where a quantised base loads. Under FSDP: host memory, quantised there, and FSDP moves
    each process's shard to its GPU (a 70B 4-bit base, ~40 GB, would not fit whole on one
    24 GB GPU). Otherwise each process's own GPU (LOCAL_RANK; models.load's default)."""
    if sharded(cfg) == "fsdp" or not on_gpu:
        return {"": "cpu"}
    return None


# ---------------------------------------------------------------- saving

def save_trained(trainer, out_dir: Path, flix_save=None) -> None:
    """Write the trained model or adapter into `out_dir`, called on every rank: FSDP and
    ZeRO-3 gather the full weights through collectives, then rank 0 writes. A full model
    trained under FSDP is written in the dtype it was loaded in (FSDP keeps fp32 masters).
    `flix_save(state_dict)`: a FLix adapter's own writer, called on rank 0."""
    import torch

    if flix_save is not None:
        state = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.is_world_process_zero():
            flix_save(state)
        return
    if getattr(trainer, "is_fsdp_enabled", False):
        # the product is a whole model whatever the checkpoints are (sharded ones resume faster)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = trainer.accelerator.get_state_dict(trainer.model)
        dtype = getattr(model.config, "dtype", None)
        if not hasattr(model, "peft_config") and isinstance(dtype, torch.dtype):
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        trainer._save(str(out_dir), state_dict=state)
    else:
        trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)  # a pickle; run.json has the config
