"""FLix training step time against one peft LoRA with the same trainable parameter count.

Both adapt the same random-initialised Llama (SmolLM2-135M's layer shape, fewer layers by
default) on the same batches of 8 x 96 tokens; each batch mixes 4 feature values (task
math/instruct x lang en/sw, FLix ranks task 16, lang 8), so FLix holds 2x16 + 2x8 = 48
rank directions per module and the LoRA has r=48. A step is forward, backward and an AdamW
update; the figure is the median step time over repeats that alternate which goes first,
and the ratio FLix / LoRA (goal <= 1.3 on CPU).

    python scripts/bench_flix.py [--layers 4] [--steps 20] [--repeats 3] [--seq 96] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

SETS = [{"task": "math", "lang": "en"}, {"task": "instruct", "lang": "sw"},
        {"task": "math", "lang": "sw"}, {"task": "instruct", "lang": "en"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_model(layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       num_hidden_layers=layers, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(conf)


def flix_model(layers: int, seed: int):
    from polyft.adapters import flix

    cfg = flix.FlixConfig(values={"task": ["instruct", "math"], "lang": ["en", "sw"]},
                          ranks={"task": 16, "lang": 8}, alpha={"task": 16.0, "lang": 8.0},
                          feature_dropout=0.1, target_modules=TARGETS)
    return flix.inject(base_model(layers, seed), cfg)


def lora_model(layers: int, seed: int, r: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base_model(layers, seed), LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS,
                                                               task_type="CAUSAL_LM"))


def time_steps(model, batches, extra) -> list[float]:
    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i, ids in enumerate(batches):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms caches and allocates optimiser state
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    import torch

    from polyft.adapters import flix

    torch.set_num_threads(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (args.batch, args.seq), generator=g) for _ in range(args.steps + 1)]
    fm = flix_model(args.layers, 0)
    r = fm.flix_config.total_rank()
    lm = lora_model(args.layers, 0, r)
    n_flix = flix.trainable_parameters(fm)
    n_lora = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    feats = flix.encode(fm.flix_config, [SETS[i % len(SETS)] for i in range(args.batch)])
    medians = {"flix": [], "lora": []}
    for rep in range(args.repeats):
        order = [("flix", fm, {"flix_features": feats}), ("lora", lm, {})]
        for name, model, extra in (order if rep % 2 == 0 else order[::-1]):
            medians[name].append(statistics.median(time_steps(model, batches, extra)))
    f, lo = statistics.median(medians["flix"]), statistics.median(medians["lora"])
    print(f"model: random Llama, hidden 576, {args.layers} layers; batch {args.batch} x {args.seq} tokens; "
          f"{torch.get_num_threads()} threads; {args.steps} steps x {args.repeats} repeats")
    print(f"trainable parameters: flix {n_flix:,} (4 feature values, ranks task 16 / lang 8); "
          f"peft LoRA r={r}: {n_lora:,}")
    print(f"step time (median): flix {f * 1000:.1f} ms, peft LoRA {lo * 1000:.1f} ms")
    print(f"ratio flix / LoRA: {f / lo:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
