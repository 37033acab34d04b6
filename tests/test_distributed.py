"""Training over several processes on CPU (gloo): DDP and FSDP against one process at the same
global batch, QLoRA whose 4-bit weights FSDP shards, and the DeepSpeed config checks.

FSDP runs for real here: accelerate enables it on accelerators only, and polyft's trainer
switches its CPU processes to FSDP2 (torch's fully_shard on gloo), so the product is gathered
and saved by the path a GPU run takes. Each run is 3 steps of SGD with a large step, so that a
difference in what the processes see (their data, the summed gradients, the gathered weights)
would show far above the tolerance (each test also checks the weights moved that far).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_refused

SGD = ["logger=none", "train.max_steps=3", "train.save_steps=3", "train.optimizer=sgd", "train.lr=0.5",
       "train.scheduler=constant", "train.warmup_ratio=0"]
FSDP = ["train.num_processes=2", "train.distributed=fsdp", "train.batch_size=4"]


def weights(product: Path) -> dict:
    name = "model.safetensors" if (product / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(product / name)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def record_of(product: Path, runs: Path) -> dict:
    """The run.json of the run that wrote `product`."""
    for f in runs.rglob("run.json"):
        r = json.loads(f.read_text())
        if Path(r.get("train", {}).get("artifact", "-")).resolve() == product.resolve():
            return r
    raise AssertionError(f"no run wrote {product}")


def train(cli, name: str, *args: str) -> tuple[Path, dict]:
    out = cli.cwd / name
    proc = cli("train", *SGD, *args, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = record_of(out, cli.cwd / "outputs" / "runs")
    rec["stdout"] = proc.stdout
    return out, rec


def test_ddp_two_processes_equal_one_at_the_same_global_batch(cli):
    """train.batch_size is per process: 2 x 4 is the global batch of 1 x 8, and the same LoRA."""
    two, rec = train(cli, "two", "train.num_processes=2", "train.batch_size=4")
    assert "batch 4 per process x 2 processes (ddp) x 1 accumulation = 8 global" in rec["stdout"]
    t = rec["train"]
    assert (t["world_size"], t["batch_per_device"], t["global_batch"]) == (2, 4, 8)
    assert t["distributed"]["params_this_rank"] == t["distributed"]["params_total"]  # DDP: whole copies
    one, rec1 = train(cli, "one", "train.batch_size=8")
    assert rec1["train"]["global_batch"] == 8 and "distributed" not in rec1["train"]
    a, b = weights(two), weights(one)
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)  # lora_B starts at zero
    diff = max_diff(a, b)
    print(f"DDP 2x4 vs 1x8: max |diff| {diff:.2e}, lora_B moved {moved:.2e}")
    assert moved > 1e-2 and diff <= 1e-6


def test_fsdp_full_model_is_sharded_on_cpu_and_saved_whole(cli, tiny_llama_dir):
    """FSDP with the settings researchers set (sharded checkpoints, FSDP's activation
    checkpointing, rank 0's copy filling the shards): each rank holds half the weights, one
    FSDP unit per decoder layer, and the product equals one process's."""
    args = [*FSDP, "train.fsdp.state_dict_type=sharded", "train.fsdp.activation_checkpointing=true",
            "train.fsdp.cpu_ram_efficient_loading=true", "train.save_steps=2"]
    two, rec = train(cli, "fsdp", "adapter=full", *args)
    d = rec["train"]["distributed"]
    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert d["mode"] == "fsdp" and d["fsdp_units"]["LlamaDecoderLayer"] == layers
    assert d["params_this_rank"] * 2 == d["params_total"]
    one, _ = train(cli, "one", "adapter=full", "train.batch_size=8")
    a, b, base = weights(two), weights(one), load_file(tiny_llama_dir / "model.safetensors")
    moved, diff = max_diff(b, base), max_diff(a, b)
    print(f"FSDP 2x4 vs 1x8 (full model): max |diff| {diff:.2e}, moved {moved:.2e}")
    assert moved > 1e-2 and diff <= 1e-6
    assert {v.dtype for v in a.values()} == {torch.float32}  # the dtype it loaded in
    assert not (two / "training_args.bin").exists()


def test_qlora_fsdp_shards_the_4bit_base(cli):
    """QLoRA with FSDP: the packed 4-bit weights are stored as floats (quant.quant_storage
    null: the load dtype), so FSDP shards them too; the adapter is one process's. TRL keeps a
    quantised base's LoRA in bf16 (8 significant bits), whose roundings may fall apart."""
    two, rec = train(cli, "fsdp", "quant=4bit", *FSDP)
    d = rec["train"]["distributed"]
    assert d["params_this_rank"] * 2 == d["params_total"], d
    one, _ = train(cli, "one", "quant=4bit", "train.batch_size=8")
    a, b = weights(two), weights(one)
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    diff = max_diff(a, b)
    print(f"QLoRA-FSDP 2x4 vs 1x8: max |diff| {diff:.2e}, lora_B moved {moved:.2e}")
    assert moved > 5e-2 and diff <= 4e-3


# ---------------------------------------------------------------- DeepSpeed configs

@pytest.mark.parametrize("content,args,words", [
    (None, ["train.distributed=deepspeed"], ["train.distributed=deepspeed", "train.deepspeed_config", "zero3"]),
    (None, ["train.distributed=deepspeed", "train.deepspeed_config=missing.json"], ["missing.json", "no such file"]),
    ('{"zero_optimization": {"stage": 3},\n "bf16": }', ["train.distributed=deepspeed"], ["not valid JSON", "line 2"]),
    ('{"train_batch_size": "auto"}', ["train.distributed=deepspeed"], ["no zero_optimization"]),
    ('{"zero_optimization": {"stage": 4}}', ["train.distributed=deepspeed"], ["zero_optimization.stage=4"]),
    (None, ["train.deepspeed_config=zero3"], ["train.deepspeed_config=zero3", "train.distributed=deepspeed"]),
])
def test_bad_deepspeed_config_is_refused_in_one_line(cli, content, args, words):
    if content is not None:
        (cli.cwd / "ds.json").write_text(content)
        args = [*args, f"train.deepspeed_config={cli.cwd / 'ds.json'}"]
    assert_refused(cli, "train", *args, words=words)


def test_deepspeed_on_a_cpu_machine_is_refused_in_one_line(cli):
    """Two processes with a valid config, on CPU: accelerate starts DeepSpeed on accelerators
    only (or the package is missing): one line, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs DeepSpeed (tests/test_gpu.py)")
    assert_refused(cli, "train", "train.distributed=deepspeed", "train.deepspeed_config=zero2",
                   "train.num_processes=2", words=["train.distributed=deepspeed"])


RESOLVE = r"""
import json, sys
from transformers import AutoModelForCausalLM, TrainingArguments
from deepspeed.runtime.config import DeepSpeedConfig
from polyft.sharding import deepspeed_file, zero_offload, zero_stage
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # before a ZeRO-3 config is alive
out = {}
for name in ("zero2", "zero3", "zero3_offload"):
    args = TrainingArguments(output_dir=sys.argv[2], deepspeed=str(deepspeed_file(name)), report_to=[],
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.7,
                             learning_rate=3e-4, weight_decay=0.01)
    hf = args.hf_deepspeed_config
    hf.trainer_config_finalize(args, model, num_training_steps=10)
    conf = hf.config
    parsed = DeepSpeedConfig(conf)  # DeepSpeed's own parser and batch arithmetic
    out[name] = {"stage": zero_stage(conf), "offload": zero_offload(conf),
                 "micro": conf["train_micro_batch_size_per_gpu"], "accum": conf["gradient_accumulation_steps"],
                 "global": parsed.train_batch_size, "clip": conf["gradient_clipping"],
                 "auto_left": "auto" in json.dumps(conf),
                 "gather16": parsed.zero_config.gather_16bit_weights_on_model_save}
print(json.dumps(out))
"""


def test_shipped_deepspeed_configs_resolve_in_transformers_and_deepspeed(tmp_path, tiny_llama_dir):
    """zero2, zero3 and zero3_offload: transformers fills every "auto" from the training
    arguments, DeepSpeed's parser takes the result, and ZeRO-3 gathers 16-bit weights on save
    (what the trainer writes the product from). In a process of its own: a ZeRO-3 config
    switches transformers' model loading to DeepSpeed's for the rest of the process."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install 'polyft[deepspeed]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", RESOLVE, str(tiny_llama_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, stage, offload in (("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)):
        g = got[name]
        assert (g["stage"], g["micro"], g["accum"], g["global"], g["clip"]) == (stage, 4, 2, 4 * 2 * 1, 0.7), g
        assert g["offload"] == {"optimizer": offload, "param": offload} and not g["auto_left"]
        assert g["gather16"] or stage < 3


# ---------------------------------------------------------------- FSDP settings and presets

def test_fsdp_keys_are_what_accelerate_builds_its_plugin_from(tmp_path):
    """Each train.fsdp key reaches accelerate's FSDP2 plugin through transformers' arguments
    (offload and wrapping are not exercised by the CPU runs: offload needs an accelerator)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from omegaconf import OmegaConf
    from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType
    from transformers import TrainingArguments

    from polyft.config.schema import TrainConfig
    from polyft.sharding import fsdp_config

    def plugin(on_gpu, **fsdp):
        t = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"name": "x", "gradient_checkpointing": True,
                                                                "fsdp": fsdp})
        with mock.patch.dict(os.environ):  # transformers exports FSDP_* variables
            args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=fsdp_config(t, on_gpu),
                                     use_cpu=True, report_to=[])
            return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)

    p = plugin(True, wrap_layer_cls=["LlamaDecoderLayer"], reshard_after_forward=False, cpu_offload=True,
               cpu_ram_efficient_loading=True, state_dict_type="sharded", activation_checkpointing=None)
    assert p.fsdp_version == 2 and isinstance(p.cpu_offload, CPUOffloadPolicy)
    assert p.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"] and p.reshard_after_forward is False
    assert p.state_dict_type == StateDictType.SHARDED_STATE_DICT and p.cpu_ram_efficient_loading
    assert p.activation_checkpointing  # null follows train.gradient_checkpointing
    p = plugin(False, cpu_offload=True, activation_checkpointing=False)
    assert not isinstance(p.cpu_offload, CPUOffloadPolicy)  # on CPU the shards are in host memory already
    assert p.transformer_cls_names_to_wrap is None  # accelerate reads the model's _no_split_modules
    assert p.state_dict_type == StateDictType.FULL_STATE_DICT and not p.activation_checkpointing
    assert p.reshard_after_forward is True


@pytest.mark.parametrize("args,words", [
    (["train.fsdp.state_dict_type=local"], ["train.fsdp.state_dict_type=local", "sharded"]),
    (["train.fsdp.wrap_layer_cls=[]"], ["train.fsdp.wrap_layer_cls"]),
    (["quant=8bit", *FSDP], ["quant=8bit", "train.distributed=fsdp"]),
    (["quant.quant_storage=int4", "quant=4bit"], ["quant.quant_storage=int4", "bfloat16"]),
    (["quant.quant_storage=bfloat16"], ["quant.quant_storage=bfloat16", "4-bit"]),
])
def test_bad_sharding_keys_are_refused_in_one_line(cli, args, words):
    assert_refused(cli, "train", *args, words=words)


def test_70b_presets_compose_and_plan_without_a_download(cli):
    import yaml

    qlora = cli("train", "+exp=qlora_fsdp_70b", "--cfg", "job")
    assert qlora.returncode == 0, qlora.stderr[-2000:]
    c = yaml.safe_load(qlora.stdout)
    assert c["model"]["path"] == "meta-llama/Llama-3.1-70B" and c["model"]["num_layers"] == 80
    assert (c["quant"]["bits"], c["quant"]["quant_storage"], c["adapter"]["type"]) == (4, "bfloat16", "lora")
    t = c["train"]
    assert (t["num_processes"], t["distributed"], t["fsdp"]["cpu_offload"]) == (2, "fsdp", True)
    full = cli("train", "+exp=full_fsdp_70b", "--cfg", "job")
    assert full.returncode == 0, full.stderr[-2000:]
    c = yaml.safe_load(full.stdout)
    assert (c["adapter"]["type"], c["quant"]["bits"], c["train"]["num_processes"]) == ("full", None, 16)
    assert c["train"]["fsdp"]["state_dict_type"] == "sharded" and c["train"]["precision"] == "bf16"
    # Llama 3.1 70B from the preset's numbers: 70,553,706,496 parameters (Meta's model card: 70.6B)
    h, i, kv, layers, vocab = 8192, 28672, 8 * 128, 80, 128256
    total = layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * vocab * h + h
    lora = layers * 64 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # r=64 on every linear
    for exp, trainable, params in (("qlora_fsdp_70b", lora, total + lora), ("full_fsdp_70b", total, total)):
        plan = cli("plan", f"+exp={exp}")
        assert plan.returncode == 0, plan.stderr[-2000:]
        row = next(line for line in plan.stdout.splitlines() if "llama-3.1-70b" in line)
        shown = f"{trainable / 1e6:.2f}M" if trainable < 1e9 else f"{trainable / 1e9:.2f}B"
        assert f"{params / 1e9:.2f}B" in row and shown in row, row
    assert total == 70_553_706_496
    assert not (cli.cwd / "outputs" / "runs").exists()
