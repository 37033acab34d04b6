"""`polyft plan` over several GPUs and nodes: the per-GPU states of DDP, FSDP and ZeRO against
the formulas (written out here), published setups (QLoRA-FSDP 70B on 2 x 24 GB; full
fine-tuning of a 70B over 16 GPUs), what plan.fit asks SLURM for, and refusals."""

from __future__ import annotations

import json
import re

import pytest

from conftest import assert_user_error

GIB = 2 ** 30
# Llama-3-70B (conf/model/llama-3.1-70b.yaml); Llama-2-70B differs only in its vocabulary (32000)
H, L, I, HEADS, KV_HEADS, V3, V2 = 8192, 80, 28672, 64, 8, 128256, 32000
KV = H // HEADS * KV_HEADS


def layer_linear() -> int:
    """q, o: h x h; k, v: h x kv; gate, up, down: h x i."""
    return 2 * H * H + 2 * H * KV + 3 * H * I


def other_params(vocab: int) -> int:
    """Embeddings and head (untied), two norms per layer and the final norm."""
    return 2 * vocab * H + (2 * L + 1) * H


def params(vocab: int) -> int:
    return L * layer_linear() + other_params(vocab)


def cfg_of(*overrides: str):
    from polyft.cli.compose import compose
    from polyft.config.rules import validate

    cfg = compose("plan", list(overrides))
    validate(cfg)
    return cfg


def states(e) -> float:
    """Model states a GPU holds: parameters, gradients, optimizer state (ZeRO's 'model states')."""
    return e.weights + e.adapter + e.gradients + e.optimizer


FULL_70B = ("model=llama-3.1-70b", "adapter=full", "train.gradient_checkpointing=true", "train.batch_size=1",
            "data.max_length=2048")


def test_full_70b_states_per_gpu_follow_the_zero_formulas():
    """ZeRO paper (Rajbhandari et al. 2019, sec. 3.1, 5): mixed-precision Adam keeps 2 + 2 + 12
    bytes per parameter; ZeRO-1 shards the optimizer state (4P + 12P/N), ZeRO-2 the gradients
    too (2P + 14P/N), ZeRO-3 everything (16P/N). FSDP's mixed precision (fp32 masters) holds 4 + 4 + 8 sharded: 16P/N as
    well. One process and DDP train the bf16 model as loaded: 2 + 2 + 4, DDP plus its buckets."""
    from polyft.commands.plan import Layout, estimate

    cfg = cfg_of(*FULL_70B)
    p = params(V3)
    assert p == pytest.approx(70.55e9, rel=1e-3)
    one = estimate(cfg, "x", Layout("single"))
    assert states(one) == pytest.approx((2 + 2 + 4) * p)
    for n in (2, 8, 16, 64):
        zero1, zero2 = estimate(cfg, "x", Layout("zero1", n)), estimate(cfg, "x", Layout("zero2", n))
        zero3 = estimate(cfg, "x", Layout("zero3", n))
        assert states(zero1) == pytest.approx(4 * p + 12 * p / n)
        fsdp, ddp = estimate(cfg, "x", Layout("fsdp", n)), estimate(cfg, "x", Layout("ddp", n))
        assert states(zero2) == pytest.approx(2 * p + 14 * p / n)
        assert states(zero3) == pytest.approx(16 * p / n)
        assert states(fsdp) == pytest.approx(16 * p / n) and fsdp.weights == pytest.approx(4 * p / n)
        assert states(ddp) == pytest.approx(8 * p) and ddp.gathered == pytest.approx(2 * p)
        # units in use at once: the root (embeddings, head, norm) and two layers gathered in bf16,
        # and one layer's gradients before the reduce-scatter
        assert fsdp.gathered == pytest.approx(2 * other_params(V3) + 3 * 2 * (layer_linear() + 2 * H))
        off = estimate(cfg, "x", Layout("zero3", n, offload_params=True, offload_optimizer=True))
        assert states(off) == 0 and off.host == pytest.approx(16 * p / n)
    peaks = [estimate(cfg, "x", Layout(kind, n)).peak for kind in ("fsdp", "zero3") for n in (2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(peaks[:5], peaks[1:5])) and all(a > b for a, b in zip(peaks[5:], peaks[6:]))


def test_full_70b_over_16_gpus_fits_80gb_with_fsdp_and_zero3_not_over_8():
    """Published: Llama-2-70B full fine-tuning with FSDP on 2 nodes x 8 A100 80GB (bs 1, 2048
    tokens, activation checkpointing; HF blog 'Fine-tuning Llama 2 70B using PyTorch FSDP').
    16P/16 = 64.2 GiB of states leave room for the rest; over 8 GPUs, 16P/8 alone is 128 GiB."""
    from polyft.commands.plan import Layout, estimate

    cfg = cfg_of(*FULL_70B, f"model.vocab_size={V2}")
    for kind in ("fsdp", "zero3"):
        assert estimate(cfg, "x", Layout(kind, 16, 2)).fits([24, 40, 80]) == 80
        assert estimate(cfg, "x", Layout(kind, 8, 1)).fits([24, 40, 80]) is None
    assert 16 * params(V2) / 8 / GIB > 80


def test_qlora_fsdp_70b_fits_two_24gb_gpus_with_cpu_offload_only():
    """Answer.AI's FSDP-QLoRA (2024): Llama-2-70B, NF4 packed in bf16 so FSDP shards it, LoRA r 64
    on q/k/v/gate/up/down, batch 2 x 2048, activation checkpointing, FSDP full shard with CPU
    offload, on 2 x 24 GB (measured peak reserved 14.92 GiB). Without offload each GPU holds half
    the 4-bit base, 4 + 8/64 + 32/(64*256) bits per linear weight (NF4 with double quant), plus
    the bf16 embeddings and head."""
    from polyft.commands.plan import Layout, estimate

    cfg = cfg_of("model=llama-3.1-70b", f"model.vocab_size={V2}", "quant=4bit", "adapter.r=64", "adapter.alpha=16",
                 "adapter.target_modules=[q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj]",
                 "train.batch_size=2", "data.max_length=2048", "train.gradient_checkpointing=true")
    base = L * layer_linear() * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * other_params(V2)
    lora = L * 64 * ((H + H) + 2 * (H + KV) + 2 * (H + I) + (I + H))
    sharded = estimate(cfg, "x", Layout("fsdp", 2))
    assert sharded.trainable_params == lora
    assert sharded.weights == pytest.approx(base / 2) and sharded.adapter == pytest.approx(4 * lora / 2)
    assert sharded.fits([24, 40, 80]) == 40  # published: 35.6 GB per GPU without offload (HF PEFT docs)
    offload = estimate(cfg, "x", Layout("fsdp", 2, offload_params=True, offload_optimizer=True))
    assert offload.weights == offload.optimizer == 0 and offload.host == pytest.approx((base + 16 * lora) / 2)
    assert offload.fits([24, 40, 80]) == 24


PLAN_70B = ("plan", "model=llama-3.1-70b", "adapter=full", "train.distributed=fsdp", "train.num_processes=16",
            "hydra/launcher=slurm", "hydra.launcher.nodes=2")


def _comparison(stdout: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("layout",) and not cells[0].startswith("---"):
            try:
                rows[cells[0]] = [float(c) for c in cells[1:]]
            except ValueError:
                continue
    return rows


def test_plan_70b_over_two_nodes_per_gpu_falls_and_fit_asks_two_nodes_of_eight(cli):
    proc = cli(*PLAN_70B)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _comparison(proc.stdout)
    assert set(rows) >= {"DDP", "FSDP full shard", "ZeRO-2", "ZeRO-3"}, proc.stdout
    for name in ("FSDP full shard", "ZeRO-3", "ZeRO-2"):  # 2, 4, 8, 16 GPUs
        assert all(a > b for a, b in zip(rows[name][1:], rows[name][2:])), (name, rows[name])
    assert "FSDP full shard over 2 nodes x 8 GPUs" in proc.stdout
    # the demo batch without activation checkpointing fits no 80 GB GPU: plan.fit would refuse
    assert re.search(r"plan.fit would ask SLURM for 2 nodes x 8 GPUs per node, mem_gb=\d+ per node, but refuses",
                     proc.stdout), proc.stdout
    # one sequence of 2048 tokens with checkpointing fits, and the GPU type of plan.gres gets the count
    proc = cli(*PLAN_70B, *FULL_70B[2:], "+plan.gres.80=gpu:a100:1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"plan.fit asks SLURM for 2 nodes x gres gpu:a100:8 per node, mem_gb=\d+ per node", proc.stdout)
    table = [l for l in proc.stdout.splitlines() if l.startswith("| 0 |")][0].split("|")
    weights, grads, optim = (float(table[i]) for i in (7, 9, 10))
    p = params(V3)
    assert (weights, grads, optim) == (round(4 * p / 16 / GIB, 1), round(4 * p / 16 / GIB, 1), round(8 * p / 16 / GIB, 1))


def test_fit_resources_asks_the_processes_per_node_as_gpus():
    from polyft.commands.plan import fit_resources

    cfg = cfg_of(*FULL_70B, "train.distributed=fsdp", "train.num_processes=16")
    out = fit_resources(cfg, {"nodes": 2, "gpus_per_node": 1})
    assert (out["nodes"], out["gpus_per_node"]) == (2, 8)
    cfg = cfg_of(*FULL_70B, "train.distributed=fsdp", "train.num_processes=16", "+plan.gres.80=gpu:a100:1")
    out = fit_resources(cfg, {"nodes": 2})
    assert (out["nodes"], out["gres"], out["gpus_per_node"]) == (2, "gpu:a100:8", None)
    # host memory per node: each of the 8 processes reads the bf16 checkpoint (x 1.25), plus 3 GiB each
    assert out["mem_gb"] == -(-(1.25 * 8 * 2 * params(V3) + 8 * 3 * GIB) // GIB)


def test_deepspeed_config_file_sets_stage_and_offload(tmp_path):
    from polyft.commands.plan import layout_of

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    lay = layout_of(cfg_of("train.distributed=deepspeed", f"train.deepspeed_config={f}", "train.num_processes=4"))
    assert (lay.kind, lay.processes, lay.offload_params, lay.offload_optimizer) == ("zero3", 4, False, True)


@pytest.mark.parametrize("args,words", [
    (["adapter=full", "quant=4bit"], ["quant=4bit", "needs an adapter"]),
    (["train.num_processes=12", "hydra/launcher=slurm", "hydra.launcher.nodes=8"],
     ["train.num_processes=12", "8 nodes"]),
    (["train.distributed=deepspeed", "train.num_processes=2"], ["train.distributed=deepspeed", "deepspeed_config"]),
    (["train.distributed=deepspeed", "train.num_processes=2", "train.deepspeed_config=/no/such.json"],
     ["train.deepspeed_config=/no/such.json", "no such file"]),
])
def test_plan_refuses_what_train_refuses(cli, args, words):
    assert_user_error(cli("plan", *args), *words)
