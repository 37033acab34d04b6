"""The budget curve of exp=swap_powered_*: each expert's own skill on DEV items (seed 2000,
not the test rows of seed 1000) at its training checkpoints, greedy, first line, exact match
(lm-eval's strict-match: case and punctuation ignored), prompts as lm-eval renders them
(plain chat template, <bos> added by the tokenizer).

    python scripts/swap_pilot_curve.py MODEL_DIR [MODEL_DIR ...] --skill arithmetic:en --n 100

Used once, before any merge was scored, to fix the experts' budget (README, "Layer
swapping, powered"); prints one line per (model, skill): accuracy and its standard error.
"""

from __future__ import annotations

import argparse
import math
import re
import string
import sys
import time

DEV_SEED = 2000


def norm(s: str) -> str:
    s = s.strip().split("\n")[0].strip().lower()
    return re.sub(f"[{re.escape(string.punctuation)}]", "", s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--skill", action="append", required=True, help="generator:lang, e.g. numbers:de")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the first model's)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyft.data.formatting import PLAIN_TEMPLATE
    from polyft.data.synthetic import generate

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.models[0])
    tok.chat_template = PLAIN_TEMPLATE
    tok.padding_side = "left"
    for path in args.models:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for skill in args.skill:
            gen, lang = skill.split(":")
            rows = generate(gen, [lang], args.n, DEV_SEED)
            t0, right = time.time(), 0
            for i in range(0, len(rows), 8):
                batch = rows[i:i + 8]
                prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True) for r in batch]
                enc = tok(prompts, return_tensors="pt", padding=True)
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
                for r, o in zip(batch, out[:, enc.input_ids.shape[1]:]):
                    right += norm(tok.decode(o, skip_special_tokens=True)) == norm(r["response"])
            acc = right / len(rows)
            se = math.sqrt(acc * (1 - acc) / (len(rows) - 1))
            print(f"{path}\t{skill}\tacc {100 * acc:.1f}\tse {100 * se:.1f}\t({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
