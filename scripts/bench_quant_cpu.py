"""LoRA training speed on CPU over a 16-, 8- and 4-bit SmolLM2-135M base, in one run.

The baseline is the unquantised base (quant=none), measured in the same run; the figure
is seconds per step from the trainer's own clock (the first step, which pays one-time
set-up, excluded), and the ratio quantised / none. This decides which quantisation
points of `maple_real` are affordable on CPU (bitsandbytes dequantises on every matmul).

    python scripts/bench_quant_cpu.py [--steps 4] [--r 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def seconds_per_step(quant: str, steps: int, r: int, root: Path) -> float:
    from transformers import TrainerCallback

    from polyft.cli.compose import compose
    from polyft.products import train_plan
    from polyft.training import build_model, sft_config
    from polyft.data.formatting import tokenized_dataset
    from polyft.data.mixture import load_mixture
    from polyft.models.load import load_tokenizer
    from trl import SFTTrainer
    import time

    cfg = compose("train", [f"output_root={root}", "model=smollm2-135m", "logger=none", "adapter=lora",
                            f"adapter.r={r}", f"quant={quant}", "data=demo_maple", "train=smollm2_lora",
                            f"train.max_steps={steps + 1}", f"train.save_steps={100 * steps}"])
    p = train_plan(cfg)
    tok = load_tokenizer(p.model_path, False, None)
    dataset, _ = tokenized_dataset(load_mixture(cfg.data, True), tok, root)
    model, peft_config = build_model(cfg, p.model_path)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{quant}-", dir=root))
    trainer = SFTTrainer(model=model, args=sft_config(cfg, run_dir / "work", [], run_dir.name, False),
                         train_dataset=dataset.remove_columns(["lang", "task"]), processing_class=tok,
                         peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    root = Path(os.environ.get("POLYFT_BENCH_ROOT", "outputs"))
    results = {q: seconds_per_step(q, args.steps, args.r, root) for q in ("none", "8bit", "4bit")}
    import torch

    print(f"LoRA r={args.r}, SmolLM2-135M, batch 8, {args.steps} timed steps, {torch.get_num_threads()} thread(s)")
    for q, s in results.items():
        print(f"  quant={q:5s} {s:6.2f} s/step   x{s / results['none']:.2f} vs none")


if __name__ == "__main__":
    main()
