#!/usr/bin/env python
"""Benchmark `polyft merge` against mergekit on 7B-layout checkpoints scaled down.

    .venv/bin/python scripts/bench_merge.py [--root outputs/bench] [--methods linear,ties,...]
        [--pairs 5] [--no-mergekit]

Builds (once, cached under outputs/bench/models) three random bf16 Llama checkpoints
(hidden 2048, 16 layers, vocab 32000, intermediate 5632: about 1.9 GB each, two shards),
then times polyft and mergekit on the same merges, each in a child process. mergekit lives
in its own virtual environment, .venv-bench (created with `pip install mergekit` on first
use), so that it cannot move the main environment's pins. Before every timed run all inputs
are read once, so both tools start from the same warm page cache. Peak RSS is the largest
sum of RSS over the child's process tree, polled every 20 ms (/proc, as psutil reads it),
with its anonymous and file-backed parts at that moment (mapped input pages count as file).

Layer swapping without transition zones only copies tensors, so its floor is `cp -r` of one
input model: --pairs N runs polyft, then `cp -r`, N times in turn, each from the same page
cache state, and reports the median of polyft / `cp -r` over the pairs with its range, and
polyft's peak RSS. polyft runs as `python -m polyft.cli` with this checkout first on
PYTHONPATH, so the code timed is the code beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


# ----------------------------------------------------------------------------- tools

def ensure_mergekit() -> Path:
    exe = BENCH_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"installing mergekit into {BENCH_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        # torch pinned like the main environment, so both tools run the same CPU build
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "mergekit", "torch>=2.4,<2.14"],
                       check=True)
    return exe


def cases(models: list[Path]) -> dict[str, tuple[list[str], dict]]:
    """method -> (polyft overrides, mergekit config), with matching parameters."""
    base, a, b = (str(m) for m in models)
    task = {"base_model": base, "dtype": "bfloat16",
            "parameters": {"normalize": True, "lambda": 1.0},
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (a, b)]}
    return {
        "linear": ([f"merge.models=[{base},{a},{b}]"],
                   {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": True},
                    "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, a, b)]}),
        "ties": ([f"merge.models=[{a},{b}]", f"merge.base={base}", "merge.density=0.5",
                  "merge.scale=1.0"], {"merge_method": "ties", **task}),
        "dare_ties": ([f"merge.models=[{a},{b}]", f"merge.base={base}", "merge.density=0.5",
                       "merge.scale=1.0", "merge.seed=0"], {"merge_method": "dare_ties", **task}),
        # mergekit's passthrough takes the non-layer tensors from the first slice's model
        "layer_swap": ([f"merge.middle={a}", f"merge.outer={b}", "merge.bottom=4", "merge.top=2",
                        "merge.transition_bottom=0", "merge.transition_top=0", "merge.non_layer=outer"],
                       {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
                           {"sources": [{"model": b, "layer_range": [0, 4]}]},
                           {"sources": [{"model": a, "layer_range": [4, 14]}]},
                           {"sources": [{"model": b, "layer_range": [14, 16]}]}]}),
    }


def warm(paths: list[Path]) -> None:
    """Same start for every run: dirty pages flushed, every input read once (page cache)."""
    subprocess.run(["sync"], check=True)
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


PEAKS: dict = {}  # the last timed() run: peak {"rss", "anon", "file"} bytes, "cpu" seconds


def _rss_parts(pid: int) -> tuple[int, int, int]:
    """(RSS, anonymous, file-backed) bytes of one process, from /proc/PID/status."""
    parts = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                parts[name] = int(value.split()[0]) * 1024
    return parts.get("VmRSS", 0), parts.get("RssAnon", 0), parts.get("RssFile", 0) + parts.get("RssShmem", 0)


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes of the process tree, exit code)."""
    import psutil

    peak, stop = 0, threading.Event()
    PEAKS.clear()
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)

        def poll():
            nonlocal peak
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not stop.is_set():
                try:
                    tree = [_rss_parts(p.pid) for p in [root, *root.children(recursive=True)]]
                    rss = sum(t[0] for t in tree)
                    if rss > peak:
                        peak = rss
                        PEAKS.update(rss=rss, anon=sum(t[1] for t in tree), file=sum(t[2] for t in tree))
                except (psutil.Error, OSError):
                    pass
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)  # wait() with the tree's CPU time
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        stop.set()
        poller.join()
    PEAKS["cpu"] = usage.ru_utime + usage.ru_stime
    return wall, peak, code


def agreement(x: Path, y: Path, names: list[str]) -> str:
    """Largest |difference| between two outputs over a few tensors."""
    from safetensors import safe_open

    def get(d, n):
        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                if n in h.keys():
                    return h.get_tensor(n).float()
        raise KeyError(n)

    worst = 0.0
    for n in names:
        worst = max(worst, float((get(x, n) - get(y, n)).abs().max()))
    return f"{worst:.2g}"


def merge_seconds(runs: Path) -> float:
    """The merge's own time (no start-up) from the newest polyft run record."""
    newest = max(runs.rglob("run.json"), key=lambda f: f.stat().st_mtime)
    return json.loads(newest.read_text())["metrics"]["merge_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO / "outputs" / "bench"))
    ap.add_argument("--methods", default="linear,ties,dare_ties,layer_swap")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per tool for the methods mergekit does in under a minute (best is kept)")
    ap.add_argument("--no-mergekit", action="store_true", help="time polyft only")
    ap.add_argument("--pairs", type=int, default=5,
                    help="layer_swap: polyft then cp -r, this many times in turn (median and range)")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    models = ensure_models(root)
    mergekit = None if args.no_mergekit else ensure_mergekit()
    out_root, logs, runs = root / "out", root / "logs", root / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    # This checkout's polyft, whatever the environment has installed (an editable install
    # may point at another worktree).
    polyft = [sys.executable, "-m", "polyft.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    sample = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.9.mlp.down_proj.weight", "model.layers.15.mlp.up_proj.weight"]
    rows = []
    swap_pairs: list[tuple] = []  # (polyft wall, cp -r wall right after, polyft's PEAKS, cp -r CPU s)
    first_swap = float("nan")
    # A compose cache of this run's own: the first polyft run composes its config, later
    # runs of the same command line read it from the cache (polyft/cli/cache.py).
    env["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="polyft-bench-cache-")
    started = time.time()
    for method in args.methods.split(","):
        overrides, mk_config = cases(models)[method]
        used = models[1:] if method == "layer_swap" else models
        tools = ("polyft", "mergekit") if mergekit else ("polyft",)
        best: dict = {}
        repeat = 1 if method in ("ties", "dare_ties") else args.repeat  # mergekit needs minutes for these
        for rep in range(repeat):
            for tool in tools:
                out = out_root / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "polyft":
                    cmd = [*polyft, "merge", f"merge={method}", *overrides, f"output_dir={out}",
                           f"output_root={runs}", "logger=none"]
                else:
                    conf = logs / f"mergekit-{method}.yml"
                    conf.write_text(json.dumps(mk_config, indent=2))  # JSON is YAML
                    cmd = [str(mergekit), str(conf), str(out), "--lazy-unpickle", "--random-seed", "0"]
                warm(used)
                log = logs / f"{tool}-{method}.log"
                wall, peak, code = timed(cmd, log, env)
                if code != 0:
                    sys.exit(f"{tool} {method} failed (exit {code}); see {log}")
                inner = merge_seconds(runs) if tool == "polyft" else float("nan")
                print(f"  {method:<10} {tool:<8} run {rep + 1}: {wall:6.1f} s  {peak / 1e9:5.2f} GB"
                      + (f"  (merge itself {inner:.1f} s)" if tool == "polyft" else ""), flush=True)
                if method == "layer_swap" and tool == "polyft" and rep == 0:
                    first_swap = wall  # its config composed by Hydra: the cache was empty
                w, pk, inn = best.get(tool, (float("inf"), 0, float("inf")))
                best[tool] = (min(w, wall), max(pk, peak), min(inn, inner) if tool == "polyft" else inner)
        agree = "-"
        if mergekit:
            agree = agreement(out_root / f"polyft-{method}", out_root / f"mergekit-{method}", sample)
        rows.append((method, best, agree))
        for tool in tools:
            shutil.rmtree(out_root / f"{tool}-{method}", ignore_errors=True)
        if method == "layer_swap":  # each run against its floor, timed right after it from the same state
            for rep in range(args.pairs):
                pair = []
                for name, cmd in (("polyft", [*polyft, "merge", f"merge={method}", *overrides,
                                              f"output_dir={out_root / 'pair'}", f"output_root={runs}",
                                              "logger=none"]),
                                  ("cp -r", ["cp", "-r", str(models[1]), str(out_root / "pair")])):
                    shutil.rmtree(out_root / "pair", ignore_errors=True)
                    warm(used)
                    wall, _, code = timed(cmd, logs / "pair.log", env)
                    if code != 0:
                        sys.exit(f"{name} failed in pair {rep + 1} (exit {code}); see {logs / 'pair.log'}")
                    pair += [wall, dict(PEAKS)]
                shutil.rmtree(out_root / "pair", ignore_errors=True)
                swap_pairs.append((pair[0], pair[2], pair[1], pair[3]["cpu"]))
                print(f"  {method:<10} pair {rep + 1}: polyft {pair[0]:.2f} s ({pair[1]['cpu']:.2f} s CPU, "
                      f"{pair[1].get('rss', 0) / 2**20:.0f} MiB), cp -r {pair[2]:.2f} s ({pair[3]['cpu']:.2f} s CPU), "
                      f"ratio {pair[0] / pair[2]:.2f}", flush=True)
    # The floor: copying one input model, which is the size of every output.
    dst, copies = out_root / "copy", []
    for _ in range(3):
        shutil.rmtree(dst, ignore_errors=True)
        warm(models[1:2])
        copies.append(timed(["cp", "-r", str(models[1]), str(dst)], logs / "copy.log")[0])
    shutil.rmtree(dst, ignore_errors=True)
    copy_wall = min(copies)
    size = sum(f.stat().st_size for f in models[1].glob("*.safetensors"))

    print(f"\ninputs: 3 random bf16 Llama checkpoints of {size / 1e9:.2f} GB each (hidden 2048, 16 layers, "
          f"vocab 32000); {os.cpu_count()} CPUs; page cache warm and flushed before every run; "
          f"best of {args.repeat} runs for linear and layer_swap, 1 for ties and dare_ties")
    head = (f"{'method':<11}{'polyft s':>9}{'(merge s)':>10}{'mergekit s':>11}{'ratio':>7}"
            f"{'polyft GB':>10}{'mergekit GB':>12}{'ratio':>7}{'max|diff|':>10}")
    print(head + "\n" + "-" * len(head))
    nan = (float("nan"), float("nan"), float("nan"))
    for method, r, agree in rows:
        (pw, pm, pi), (mw, mm, _) = r["polyft"], r.get("mergekit", nan)
        print(f"{method:<11}{pw:9.1f}{pi:10.1f}{mw:11.1f}{pw / mw:7.2f}{pm / 1e9:10.2f}{mm / 1e9:12.2f}"
              f"{pm / mm:7.2f}{agree:>10}")
    print(f"plain copy of one input model (cp -r, the floor): {copy_wall:.2f} s (best of 3)")
    for method, r, _ in rows:
        if method == "layer_swap":
            pw, _, pi = r["polyft"]
            print(f"layer_swap / copy: {pw / copy_wall:.2f} for the whole command, "
                  f"{pi / copy_wall:.2f} for the merge itself (without Python, Hydra and import start-up)")
    if swap_pairs:
        ratios = sorted(w / c for w, c, _, _ in swap_pairs)
        top = max((p for _, _, p, _ in swap_pairs), key=lambda p: p.get("rss", 0))
        mib = {k: v / 2**20 for k, v in top.items()}
        print(f"layer_swap whole command / cp -r timed right after it, {len(ratios)} pairs in turn (config from "
              f"the compose cache): median {statistics.median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}; "
              f"polyft median {statistics.median(w for w, _, _, _ in swap_pairs):.2f} s, "
              f"cp -r median {statistics.median(c for _, c, _, _ in swap_pairs):.2f} s")
        print(f"layer_swap CPU time (user + system, the same on a busy machine): polyft median "
              f"{statistics.median(p['cpu'] for _, _, p, _ in swap_pairs):.2f} s, cp -r median "
              f"{statistics.median(c for _, _, _, c in swap_pairs):.2f} s")
        print(f"layer_swap peak RSS of the polyft process tree over the pairs: {mib.get('rss', 0):.0f} MiB "
              f"({mib.get('anon', 0):.0f} MiB anonymous, {mib.get('file', 0):.0f} MiB file-backed)")
        print(f"layer_swap first run (config composed, cache empty): {first_swap:.2f} s, "
              f"{first_swap / copy_wall:.2f}x the best cp -r")
    print(f"benchmark time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
