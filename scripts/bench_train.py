"""Training throughput: polyft versus a plain hand-written TRL script, in one run.

Both train the same tiny model with the same LoRA, data rows, steps and optimiser
settings; the figure is steps/s from the trainer's own clock (median of repeats,
alternating which goes first), and the ratio polyft / plain (target >= 0.95).
With a GPU: also QLoRA r=64 on a random-initialised 7B-shaped Llama: tokens/s and peak
GPU memory of both.

    python scripts/bench_train.py [--steps 150] [--repeats 3] [--gpu-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def polyft_cfg(root: Path, steps: int, extra: list[str]):
    from polyft.cli.compose import compose

    return compose("train", [f"output_root={root}", "logger=none", f"train.max_steps={steps}",
                             f"train.save_steps={steps * 10}", *extra])


def run_polyft(cfg, tag: str) -> dict:
    import shutil

    from polyft.products import train_plan
    from polyft.training import train

    p = train_plan(cfg)
    run_dir = Path(tempfile.mkdtemp(prefix=f"polyft-{tag}-"))
    t = time.perf_counter()
    summary = train(cfg, p.model_path, run_dir / "work", run_dir / "product", run_dir)
    summary["wall_s"] = time.perf_counter() - t
    shutil.rmtree(run_dir, ignore_errors=True)  # the next repeat trains again
    return summary


def run_plain(cfg, model_path: str, tag: str) -> dict:
    """What a researcher writes by hand with TRL: conversational prompt/completion rows."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from polyft.data.mixture import load_mixture

    rows = load_mixture(cfg.data, offline=True)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_path)
    gpu = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if gpu else torch.float32}
    if cfg.quant.bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": 0} if gpu else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    t = cfg.train
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix=f"plain-{tag}-"), max_steps=t.max_steps,
                     learning_rate=t.lr, per_device_train_batch_size=t.batch_size,
                     gradient_accumulation_steps=t.grad_accum, lr_scheduler_type=t.scheduler,
                     warmup_steps=t.warmup_ratio, logging_steps=t.logging_steps, save_steps=t.max_steps * 10,
                     seed=cfg.seed, bf16=gpu, report_to=[], max_length=cfg.data.max_length,
                     completion_only_loss=True, use_cpu=not gpu,
                     gradient_checkpointing=t.gradient_checkpointing)
    lora = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                      target_modules=list(cfg.adapter.target_modules), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    start = time.perf_counter()
    out = trainer.train()
    return {"steps_per_second": out.metrics["train_steps_per_second"],
            "train_runtime_s": out.metrics["train_runtime"], "wall_s": time.perf_counter() - start}


def cpu_bench(steps: int, repeats: int) -> dict:
    from polyft.models.load import resolve_model_path

    root = REPO / "outputs" / "bench"
    cfg = polyft_cfg(root, steps, [])
    model_path = resolve_model_path(cfg.model, cfg.output_root)
    run_polyft(cfg, "warmup")  # builds the tokenized-data cache; not timed
    ours, plain = [], []
    for i in range(repeats):
        order = [("polyft", ours), ("plain", plain)] if i % 2 == 0 else [("plain", plain), ("polyft", ours)]
        for name, sink in order:
            res = run_polyft(cfg, name) if name == "polyft" else run_plain(cfg, model_path, name)
            sink.append(res["steps_per_second"])
    a, b = statistics.median(ours), statistics.median(plain)
    return {"steps": steps, "repeats": repeats, "polyft_steps_per_s": a, "plain_steps_per_s": b,
            "ratio": a / b, "polyft_all": ours, "plain_all": plain}


def gpu_bench(steps: int) -> dict:
    """QLoRA r=64 on a random 7B-shaped Llama (no download): tokens/s and peak memory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from polyft.models.load import resolve_model_path

    root = REPO / "outputs" / "bench"
    big = root / "llama-7b-shape"
    tiny_cfg = polyft_cfg(root, steps, [])
    tiny_path = resolve_model_path(tiny_cfg.model, tiny_cfg.output_root)
    if not (big / "config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_path)
        conf = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
        model.save_pretrained(big, safe_serialization=True)
        tok.save_pretrained(big)
        del model
        torch.cuda.empty_cache()
    extra = ["model=llama-2-7b", f"model.path={big}", "quant=4bit", "adapter.r=64", "adapter.alpha=128",
             "train.batch_size=4", "train.gradient_checkpointing=true", "data.max_length=512"]
    cfg = polyft_cfg(root, steps, extra)
    results = {}
    for name in ("polyft", "plain"):
        torch.cuda.reset_peak_memory_stats()
        res = run_polyft(cfg, name) if name == "polyft" else run_plain(cfg, str(big), name)
        results[name] = {"steps_per_second": res["steps_per_second"],
                         "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
        torch.cuda.empty_cache()
    results["ratio_steps"] = results["polyft"]["steps_per_second"] / results["plain"]["steps_per_second"]
    results["ratio_memory"] = results["polyft"]["peak_gpu_gib"] / results["plain"]["peak_gpu_gib"]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-steps", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    res = {"cpu": cpu_bench(args.steps, args.repeats)}
    c = res["cpu"]
    print(f"tiny LoRA, {c['steps']} steps x {c['repeats']}: polyft {c['polyft_steps_per_s']:.2f} steps/s, "
          f"plain TRL {c['plain_steps_per_s']:.2f} steps/s, ratio {c['ratio']:.3f} (target >= 0.95)")
    import torch

    if torch.cuda.is_available():
        g = res["gpu"] = gpu_bench(args.gpu_steps)
        print(f"7B-shape QLoRA r=64: polyft {g['polyft']['steps_per_second']:.3f} steps/s "
              f"{g['polyft']['peak_gpu_gib']:.1f} GiB; plain {g['plain']['steps_per_second']:.3f} steps/s "
              f"{g['plain']['peak_gpu_gib']:.1f} GiB; ratios steps {g['ratio_steps']:.3f} memory {g['ratio_memory']:.3f}")
    else:
        print("no GPU: the 7B-shape QLoRA part is skipped")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
