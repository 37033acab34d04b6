#!/usr/bin/env python
"""Peak memory of `merge_back=true` on the merge benchmark's base model, and its agreement
with peft's merge_and_unload.

    .venv/bin/python scripts/bench_merge_back.py [--root outputs/bench] [--rank 16] [--no-old] [--no-check]

The base is scripts/bench_merge.py's (random bf16 Llama, hidden 2048, 16 layers, vocab
32000: 0.95B parameters, 1.9 GB in two shards, built once under <root>/models/base). The
product is what `polyft train adapter=lora` leaves before merging: a LoRA of rank --rank on
all seven linears of every layer (fp32 weights, random A and B from a seed) beside the
tokenizer-less adapter config. merge_back (polyft.training.merge_back) then runs in a child
process whose peak RSS is polled every 20 ms (bench_merge.timed: the process tree, /proc);
the inputs are read once before, so every run starts from the same page cache. --no-old
skips the whole-model path it replaced (peft's merge_and_unload on the base loaded in bf16),
which runs the same way for comparison.

Agreement: the merged tensors against peft's merge_and_unload on the base loaded as stored
(bf16) and in fp32, cast to bf16 at the end (the arithmetic merge_back does), as the largest
|difference| over all tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402  (scripts/ is not a package)

REPO = bench_merge.REPO
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHILD = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
from polyft import training
cfg = OmegaConf.create({"model": {"name": "bench", "revision": None, "dtype": "auto", "trust_remote_code": False,
                                  "tiny": None}, "allow_pickle": False})
product, base, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if how == "stream":
    training.merge_back(product, base, cfg)
else:
    training._merge_back_peft(product, base, cfg, product / "merged")
"""


def write_adapter(base: Path, out: Path, rank: int, seed: int = 0) -> int:
    """A peft LoRA product for `base` (config written by peft itself); returns its parameter count."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from bench_merge import LAYOUT, tensor_shapes

    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEARS), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in tensor_shapes(LAYOUT):
        if name.split(".")[-2] in LINEARS:
            module = f"base_model.model.{name[:-len('.weight')]}"
            out_f, in_f = shape
            weights[f"{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            weights[f"{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in weights.values())


def run(product: Path, base: Path, how: str, logs: Path) -> tuple[float, int]:
    shutil.rmtree(product / "merged", ignore_errors=True)
    bench_merge.warm([base])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    wall, peak, code = bench_merge.timed([sys.executable, "-c", CHILD, str(product), str(base), how],
                                         logs / f"merge_back-{how}.log", env)
    if code != 0:
        sys.exit(f"merge_back ({how}) failed; see {logs / f'merge_back-{how}.log'}")
    return wall, peak


def merged_tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def peft_reference(base: Path, product: Path, dtype) -> dict:
    """merge_and_unload on the base loaded in `dtype`, as bf16 tensors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, product).merge_and_unload()
    return {k: v.detach().to(torch.bfloat16) for k, v in merged.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO / "outputs" / "bench"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-old", action="store_true", help="skip the whole-model peft path")
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with merge_and_unload")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    base = root / "models" / "base"
    if not (base / "model.safetensors.index.json").exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {base} ...", flush=True)
        bench_merge.build_checkpoint(base, 0)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    product, logs = root / "merge_back" / f"lora-r{args.rank}", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = write_adapter(base, product, args.rank)
    print(f"base {base}: {size / 1e9:.2f} GB bf16; LoRA r={args.rank} on {', '.join(LINEARS)}: "
          f"{n / 1e6:.1f}M parameters", flush=True)
    result = {"base_bytes": size, "rank": args.rank, "lora_params": n}
    runs = [("stream", "merge_back (merge engine, streamed)")]
    if not args.no_old:
        runs.insert(0, ("peft", "whole-model peft merge_and_unload (the path replaced)"))
    for how, label in runs:
        wall, peak = run(product, base, how, logs)
        parts = bench_merge.PEAKS
        result[how] = {"wall_s": round(wall, 2), "peak_rss": peak, "anon": parts.get("anon"), "file": parts.get("file")}
        print(f"{label}: {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB ({peak / 1e9:.2f} GB; anonymous "
              f"{parts.get('anon', 0) / 2**30:.2f} GiB, file-backed {parts.get('file', 0) / 2**30:.2f} GiB)", flush=True)
        if how == "peft":
            shutil.rmtree(product / "merged-peft", ignore_errors=True)
            (product / "merged").rename(product / "merged-peft")
    if not args.no_check:
        import torch

        got = merged_tensors(product / "merged")
        for dtype, what in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            d = max_diff(got, peft_reference(base, product, dtype))
            result[f"max_abs_diff_vs_peft_{what}"] = d
            print(f"max |merged - peft merge_and_unload on the {what} base, as bf16|: {d:.3g}", flush=True)
        if not args.no_old:
            d = max_diff(got, merged_tensors(product / "merged-peft"))
            result["max_abs_diff_vs_old_path"] = d
            print(f"max |merged - the replaced path's output|: {d:.3g}", flush=True)
    (root / "merge_back" / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
