#!/usr/bin/env python
"""Benchmark `polyft merge` against mergekit on 7B-layout checkpoints scaled down.

    .venv/bin/python scripts/bench_merge.py [--root outputs/bench] [--methods linear,ties,...]

Builds (once, cached under outputs/bench/models) three random bf16 Llama checkpoints
(hidden 2048, 16 layers, vocab 32000, intermediate 5632: about 1.9 GB each, two shards),
then times polyft and mergekit on the same merges, each in a child process. mergekit lives
in its own virtual environment, .venv-bench (created with `pip install mergekit` on first
use), so that it cannot move the main environment's pins. Before every timed run all inputs
are read once, so both tools start from the same warm page cache. Peak RSS is the largest
sum of RSS over the child's process tree, polled every 20 ms with psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_VENV = REPO / ".venv-bench"
LAYOUT = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
              intermediate_size=5632, vocab_size=32000)
MODELS = ("base", "expert_a", "expert_b")
SHARD_BYTES = 1_000_000_000


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of LlamaForCausalLM for config `c`, in the order HF writes them."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_checkpoint(out: Path, index: int) -> None:
    """A random bf16 checkpoint: the base, or the base plus a seeded 'fine-tuning' delta.

    Every tensor is regenerated from its own seed, so an expert is base + noise without
    the base ever being held whole."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    config = LlamaConfig(**LAYOUT, dtype="bfloat16", tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp)
    shards, current, size = [], {}, 0
    for n, (name, shape) in enumerate(tensor_shapes(LAYOUT)):
        g = torch.Generator().manual_seed(1000 + n)
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        if index:
            g.manual_seed(index * 100_000 + n)
            t += torch.randn(shape, generator=g) * 0.002
        t = t.to(torch.bfloat16)
        if current and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + t.numel() * 2
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.rename(tmp, out)


def ensure_models(root: Path) -> list[Path]:
    paths = []
    for k, name in enumerate(MODELS):
        p = root / "models" / name
        if not (p / "model.safetensors.index.json").exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            print(f"building {p} ...", flush=True)
            build_checkpoint(p, k)
        paths.append(p)
    return paths
