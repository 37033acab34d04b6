"""LoraHub search cost: seconds per candidate versus one plain forward pass, in one run.

A candidate of merge=lorahub is: write A* = sum w_i A_i, B* = sum w_i B_i into the live
LoRA modules (polyft.merge.lorahub.Composer), then the few-shot loss over the shots. The
baseline is one plain forward pass of the same model with a fixed PEFT adapter over the
same batch (no weight writes, no loss). Both are timed in the same process, alternating
which goes first, median of repeats; goal: candidate / forward <= 1.2.

    python scripts/bench_lorahub.py [--model smollm2|tiny] [--adapters 3] [--shots 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def base_dir(which: str) -> Path:
    root = REPO / "outputs"
    if which == "tiny":
        from polyft.models.tiny import TinySpec, ensure_tiny_model

        return ensure_tiny_model("tiny-llama", TinySpec(), root)
    from omegaconf import OmegaConf

    from polyft.models.gguf import ensure_converted, package_file

    preset = OmegaConf.load(REPO / "polyft" / "conf" / "model" / "smollm2-135m.yaml")
    return ensure_converted(package_file(preset.package, preset.gguf_file, preset.name), root)


def make_loras(base: Path, n: int, out: Path) -> list[Path]:
    """n LoRAs made by plain peft, r=8 on q/k/v/o, random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        conf = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)
        get_peft_model(model, conf).save_pretrained(str(out / f"lora{i}"))
        paths.append(out / f"lora{i}")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch

    from polyft.data.synthetic import generate
    from polyft.adapters.lora import read_lora
    from polyft.merge.lorahub import Composer, few_shot_batches, few_shot_loss
    from polyft.models.load import load_tokenizer

    base = base_dir(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lorahub-"))
    adapters = [read_lora(p) for p in make_loras(base, args.adapters, tmp)]
    names = sorted(n for n in adapters[0].tensors)
    rows = generate("arithmetic", ["sw"], args.shots, seed=0)
    batches = few_shot_batches(rows, load_tokenizer(str(base)), 96, args.shots)  # one batch
    composer = Composer(base, adapters, names)
    model = composer.model
    ids, attn, _ = batches[0]
    rng = random.Random(0)

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=attn)
        return time.perf_counter() - t

    def candidate() -> float:
        w = [rng.uniform(-1.5, 1.5) for _ in adapters]
        t = time.perf_counter()
        composer.set_weights(w)
        few_shot_loss(model, batches)
        return time.perf_counter() - t

    forward(), candidate()  # warm-up
    fwd, cand = [], []
    for i in range(args.repeats):
        pair = [(fwd, forward), (cand, candidate)]
        for store, fn in (pair if i % 2 == 0 else pair[::-1]):
            store.append(fn())
    result = {"model": args.model, "adapters": args.adapters, "shots": args.shots,
              "tokens": int(attn.sum()), "batch_shape": list(ids.shape), "threads": torch.get_num_threads(),
              "forward_s": statistics.median(fwd), "candidate_s": statistics.median(cand)}
    result["ratio"] = result["candidate_s"] / result["forward_s"]
    print(json.dumps(result, indent=2))
    print(f"seconds per candidate {result['candidate_s']:.4f} vs plain forward {result['forward_s']:.4f}: "
          f"ratio {result['ratio']:.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
