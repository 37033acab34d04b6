"""Evaluating a FLix adapter: every task with its own feature set, through plain peft.

A task spec names its `task` feature (the suite entry's `task:`, or XTREME-UP's task) and its
`lang`. Tasks are grouped by feature set; each group's LoRAs are composed into one standard
PEFT LoRA (polyft.adapters.flix.compose_to_peft, as `polyft merge merge=flix_compose` does)
inside the eval artifact, and lm-eval scores that adapter like any other. So the numbers
of a pair are, by construction, those of its composed adapter loaded with plain peft.
"""

from __future__ import annotations

from pathlib import Path

from polyft import console
from polyft.adapters.flix import FlixConfig, compose_to_peft, resolve_feature_set
from polyft.errors import PolyftError
from polyft.eval.harness import merge_results
from polyft.eval.models import ModelRef


def feature_sets(m, specs) -> dict[tuple, list]:
    """(resolved feature set as sorted items) -> the specs it scores; notices printed once."""

    cfg = FlixConfig.load(m.path, f"eval.model={m.ref}")
    groups: dict[tuple, list] = {}
    for s in specs:
        wanted = {"task": s.task_feature, "lang": s.lang}
        if "task" in cfg.features and not wanted["task"]:
            raise PolyftError(f"eval.tasks: {s.name} names no task feature, which the FLix adapter "
                              f"{m.ref} needs; give the entry task: T (trained: {', '.join(cfg.values['task'])})")
        fs, _ = resolve_feature_set(cfg, {t: v for t, v in wanted.items() if t in cfg.features},
                                    f"eval.tasks[{s.name}] features")
        groups.setdefault(tuple(sorted(fs.items())), []).append(s)
    return groups


def check(models, specs) -> None:
    for m in models:
        if m.kind == "flix":
            feature_sets(m, specs)


def evaluate(m, specs, out_dir: Path, score) -> tuple[dict, list[dict]]:
    """Compose each feature set under out_dir/composed/ and score its tasks with
    `score(adapter_ref, specs) -> (results, rows)`; returns merged results and all rows."""

    cfg = FlixConfig.load(m.path)
    parts, rows = [], []
    for key, group in feature_sets(m, specs).items():
        fs = dict(key)
        wanted = {"task": group[0].task_feature, "lang": group[0].lang}
        for notice in resolve_feature_set(cfg, {t: v for t, v in wanted.items() if t in cfg.features})[1]:
            console.echo(f"polyft: notice: {m.ref}, {', '.join(s.name for s in group)}: {notice}")
        d = out_dir / "composed" / "-".join(f"{t}={v}" for t, v in key)
        compose_to_peft(m.path, fs, d, base=m.base)
        results, group_rows = score(ModelRef(m.ref, str(d), "adapter", m.base), group)
        parts.append(results)
        rows.extend({**r, "features": fs} for r in group_rows)
    return merge_results(parts), rows
