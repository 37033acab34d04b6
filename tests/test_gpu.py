"""Several GPUs, for a machine that has them; skipped on one without two CUDA devices.

QLoRA on two GPUs (DDP: each process's 4-bit base on its own GPU; FSDP: the 4-bit base
sharded, in fp32 against one GPU and in the bf16 + offload recipe), full fine-tuning with FSDP
(offload, activation checkpointing, sharded checkpoints), DeepSpeed ZeRO-3 (full and LoRA) and
vLLM with tensor parallel 2. The comparisons run in fp32 (model.dtype=float32,
train.precision=fp32) against one GPU at the same global batch, where the only difference left
is the order of floating-point sums. On a GPU machine, from the repository:

    make install && .venv/bin/pip install -e '.[deepspeed]' vllm
    .venv/bin/python -m pytest -n 0 -v -s tests/test_gpu.py
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from test_distributed import max_diff, train, weights

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs, this machine has {GPUS}; run tests/test_gpu.py "
                                                 "on a GPU machine (see its docstring)")

FP32 = ["model.dtype=float32", "train.precision=fp32"]
TWO = ["train.num_processes=2", "train.batch_size=4"]
ONE = ["train.batch_size=8"]


def sharded_half(rec: dict) -> bool:
    d = rec["train"]["distributed"]
    return abs(d["params_this_rank"] * 2 - d["params_total"]) <= 64  # FSDP pads a shard to even rows


def test_qlora_ddp_puts_each_process_on_its_own_gpu(cli):
    """Under DDP every process loads the 4-bit base on its LOCAL_RANK GPU (DDP refuses a rank
    whose module sits on another rank's GPU) and the adapter is one GPU's at the same global batch."""
    two, rec = train(cli, "ddp", "quant=4bit", *FP32, *TWO)
    assert rec["train"]["device"] == "cuda" and rec["train"]["world_size"] == 2
    one, _ = train(cli, "one", "quant=4bit", *FP32, *ONE)
    diff = max_diff(weights(two), weights(one))
    print(f"QLoRA DDP 2 GPUs vs 1: max |diff| {diff:.2e}")
    assert diff <= 4e-3  # TRL keeps a quantised base's LoRA in bf16


def test_qlora_fsdp_shards_the_4bit_base_over_two_gpus(cli):
    two, rec = train(cli, "fsdp", "quant=4bit", *FP32, *TWO, "train.distributed=fsdp")
    assert sharded_half(rec), rec["train"]["distributed"]
    one, _ = train(cli, "one", "quant=4bit", *FP32, *ONE)
    diff = max_diff(weights(two), weights(one))
    print(f"QLoRA-FSDP 2 GPUs vs 1: max |diff| {diff:.2e}")
    assert diff <= 4e-3


def test_qlora_fsdp_recipe_bf16_offload_trains_and_loads(cli, tiny_llama_dir):
    """The QLoRA-FSDP recipe of the 70B preset at tiny scale: bf16 storage and compute,
    parameter offload, FSDP's activation checkpointing, rank 0's copy filling the shards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, rec = train(cli, "recipe", "quant=4bit", *TWO, "train.distributed=fsdp", "quant.quant_storage=bfloat16",
                     "train.precision=bf16", "train.gradient_checkpointing=true", "train.fsdp.cpu_offload=true",
                     "train.fsdp.cpu_ram_efficient_loading=true", "train.max_steps=20", "train.logging_steps=2",
                     "train.lr=1e-3", "train.optimizer=adamw_torch")
    assert sharded_half(rec), rec["train"]["distributed"]
    losses = [h["loss"] for h in rec["history"]]
    assert losses[-1] < losses[0], losses
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[1, 5, 9, 14, 22]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, out)(ids).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_full_finetuning_on_two_gpus(cli, tiny_llama_dir, precision):
    """Parameters offloaded, FSDP's activation checkpointing, sharded checkpoints; the product
    is whole, in the dtype it loaded in, and (fp32) one GPU's at the same global batch."""
    args = ["adapter=full", "train.distributed=fsdp", "train.fsdp.cpu_offload=true",
            "train.fsdp.activation_checkpointing=true", "train.fsdp.state_dict_type=sharded", "train.save_steps=2"]
    if precision == "bf16":
        out, rec = train(cli, "bf16", *TWO, *args, "train.precision=bf16", "model.dtype=bfloat16")
        assert sharded_half(rec) and {v.dtype for v in weights(out).values()} == {torch.bfloat16}
        return
    two, rec = train(cli, "fsdp", *FP32, *TWO, *args)
    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert sharded_half(rec) and rec["train"]["distributed"]["fsdp_units"]["LlamaDecoderLayer"] == layers
    one, _ = train(cli, "one", "adapter=full", *FP32, *ONE)
    diff = max_diff(weights(two), weights(one))
    print(f"FSDP full 2 GPUs vs 1: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_deepspeed_zero3_on_two_gpus(cli, adapter):
    """ZeRO-3 splits the weights; the trainer gathers them (16-bit gathering on save, here
    fp32) so the product is whole and one GPU's at the same global batch."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')")
    two, rec = train(cli, "zero3", f"adapter={adapter}", *FP32, *TWO, "train.distributed=deepspeed",
                     "train.deepspeed_config=zero3")
    d = rec["train"]["distributed"]
    assert d["mode"] == "deepspeed" and d["params_this_rank"] < d["params_total"]
    one, _ = train(cli, "one", f"adapter={adapter}", *FP32, *ONE)
    diff = max_diff(weights(two), weights(one))
    print(f"ZeRO-3 {adapter} 2 GPUs vs 1: max |diff| {diff:.2e}")
    assert diff <= 1e-5


def test_vllm_tensor_parallel_two_scores_as_one_gpu(cli):
    """vLLM with the model split over two GPUs (tensor parallel) scores the demo suite as one
    GPU does (fp32; at most one item of a task may fall the other way on a near tie)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm)")
    from polyft.config.schema import EvalConfig

    if "tensor_parallel_size" not in {f.name for f in dataclasses.fields(EvalConfig)}:
        pytest.skip("this polyft has no eval.tensor_parallel_size (issue 20, multi-GPU eval)")
    limit = 20
    scores = {}
    for tp in (1, 2):
        proc = cli("eval", "eval.backend=vllm", f"eval.tensor_parallel_size={tp}", f"eval.limit={limit}",
                   "model.dtype=float32", f"hydra.run.dir={cli.cwd / f'tp{tp}'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rec = json.loads((cli.cwd / f"tp{tp}" / "run.json").read_text())
        scores[tp] = {(r["task"], r["metric"], r["filter"]): r["value"] for r in rec["metrics"]["results"]}
    assert scores[1].keys() == scores[2].keys() and scores[1]
    for k, v in scores[1].items():
        assert abs(scores[2][k] - v) <= 1 / limit + 1e-9, (k, v, scores[2][k])
