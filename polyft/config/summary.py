"""A composed config in a few lines: what a command is about to do (the console's first lines).

Under an experiment the lines describe what runs: each expert with its own adapter, data and
steps (not the root's groups, which the experts override), the merges the experiment names
(none when it names none), and every model the eval scores, as given (paths whole).
"""

from __future__ import annotations

from polyft.config.experiment import eval_models, expert_cfg, main_merge_name, merge_cfg, merge_names


def adapter_text(a) -> str:
    if a.type == "full":
        return "full"
    if a.type == "flix":
        return "flix " + ",".join(f"{t}={a.ranks[t]}" for t in a.features if t in a.ranks)
    if a.get("match"):
        return f"lora sized to match {a.match}"
    alpha = f"{a.alpha_ratio:g} x r" if a.get("alpha_ratio") is not None else f"{float(a.alpha):g}"
    return f"lora r={a.r} alpha={alpha}"


def batch_line(t) -> str:
    """train.batch_size is per process; with several processes or accumulation, the global batch too."""
    n, acc = int(t.num_processes), int(t.grad_accum)
    if n == 1 and acc == 1:
        return f"batch {t.batch_size}"
    procs = f"{n} processes ({t.distributed})" if n > 1 else "1 process"
    return f"batch {t.batch_size} per process x {procs} x {acc} accumulation = {t.batch_size * n * acc} global"


def training_text(cfg) -> str:
    t = cfg.train
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    return (f"model {cfg.model.name}, adapter {adapter_text(cfg.adapter)}, quant {cfg.quant.name}; "
            f"data {cfg.data.name}, train {t.name}: {steps}, lr {t.lr:g}, {batch_line(t)}")


def merge_text(cfg) -> str:
    m = cfg.merge
    name = m.name or m.method
    head = name if name == m.method else f"{name} ({m.method})"
    if m.method == "layer_swap":
        return f"{head}: middle {m.middle}, outer {m.outer}, bottom {m.bottom}, top {m.top}"
    refs = [*m.models] or [*m.adapters] or ([m.adapter] if m.get("adapter") else [])
    return f"{head}: " + ", ".join(str(r) for r in refs) if refs else head


def lines(cfg, point: str | None = None) -> list[str]:
    c = cfg.command
    head = [f"polyft {c}"] + ([f"point {point}"] if point else [])
    if cfg.get("exp_name"):
        head.append(f"exp={cfg.exp_name}")
    head.append(f"seed={cfg.seed}")
    out = [" ".join(head)]
    experiment = bool(cfg.get("experts") or cfg.get("baselines"))
    if c in ("train", "run", "plan"):
        if cfg.get("experts"):
            for name in [cfg.expert] if cfg.get("expert") else list(cfg.experts):
                out.append(f"  expert {name}: {training_text(expert_cfg(cfg, name))}")
        else:
            out.append(f"  {training_text(cfg)}")
    if c in ("merge", "run"):
        names = merge_names(cfg) if experiment else [main_merge_name(cfg)]
        out += [f"  merge {merge_text(merge_cfg(cfg, n) if experiment else cfg)}" for n in names]
    if c in ("eval", "run"):
        e = cfg.eval
        models = eval_models(cfg) if experiment else (list(e.models) if e.models is not None else [e.model])
        limit = f", limit {e.limit}" if e.limit else ""
        base = f" (base: {cfg.model.name}, quant {cfg.quant.name})" if "base" in map(str, models) else ""
        out.append(f"  eval {e.suite} on {', '.join(map(str, models))}{base}{limit}")
    return out
