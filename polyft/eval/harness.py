"""Running lm-evaluation-harness on resolved tasks, and its results as rows.

Every task runs from a small generated YAML that `include`s the task's own YAML by absolute
path and sets only what polyft changes (the task name, local data files, the few-shot
count), so the task is otherwise exactly lm-eval's (or the user's). lm-eval resolves
`!function` entries relative to the included file, so task utilities keep working. The
generated directory is the TaskManager's only include path (include_defaults=False): the
index then holds a handful of tasks instead of lm-eval's ~14k, which it would take ~7 s
to parse on every run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from polyft.eval.specs import TaskSpec

RESULTS_RAW = "results.json"
RESULTS_ROWS = "results.jsonl"
ROW_KEYS = ("model", "task", "lang", "metric", "filter", "value", "stderr", "n")


def task_yaml(spec: TaskSpec) -> dict:
    conf = {"include": str(spec.source), "task": spec.name, **spec.overrides}
    if spec.num_fewshot is not None:
        conf["num_fewshot"] = spec.num_fewshot
    return conf


def write_task_dir(specs: list[TaskSpec], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (directory / f"{spec.name}.yaml").write_text(
            yaml.safe_dump(task_yaml(spec), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return directory


def task_manager(task_dir: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)


def evaluate(lm, specs: list[TaskSpec], task_dir: Path, *, gen_kwargs: dict | None = None,
             log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on the tasks, one model: one call per distinct (limit, chat
    template or not), everything else at simple_evaluate's defaults (seeds, fewshot order)."""
    import lm_eval

    tm = task_manager(task_dir)
    groups: dict = {}
    for spec in specs:
        groups.setdefault((spec.limit, spec.chat), []).append(spec.name)
    parts = []
    for (limit, chat), names in groups.items():
        parts.append(lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=tm, limit=limit, log_samples=log_samples,
            apply_chat_template=chat, gen_kwargs=dict(gen_kwargs) if gen_kwargs else None))
    return merge_results(parts)


def merge_results(parts: list[dict]) -> dict:
    """Several simple_evaluate results (disjoint tasks) as one."""
    merged = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key] = {**merged[key], **value}
    return merged


def _number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(x) else x


def result_rows(results: dict, model: str, langs: dict[str, str | None]) -> list[dict]:
    """One row per (task, metric, filter): model, task, lang, metric, filter, value, stderr, n."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or _number(value) is None:
                continue
            metric, filt = key.split(",", 1)
            rows.append(dict(zip(ROW_KEYS, (model, task, langs.get(task), metric, filt, value,
                                            _number(metrics.get(f"{metric}_stderr,{filt}")), n))))
    return rows


def write_results(directory: Path, results: dict, rows: list[dict]) -> None:
    """The raw lm-eval results, samples (one jsonl per task) if logged, and the rows."""
    from lm_eval.utils import handle_non_serializable

    results = dict(results)
    samples = results.pop("samples", None)
    (directory / RESULTS_RAW).write_text(
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False), encoding="utf-8")
    if samples:
        (directory / "samples").mkdir()
        for task, items in samples.items():
            with open(directory / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as fh:
                for item in items:
                    fh.write(json.dumps(item, default=handle_non_serializable, ensure_ascii=False) + "\n")
    write_rows(directory / RESULTS_ROWS, rows)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_labels(refs) -> dict[str, str]:
    """A short label per model ref: a path's last part (a product's directory name), unless
    two refs share it; never cut."""
    refs = list(dict.fromkeys(str(r) for r in refs))
    short = {r: Path(r).name if "/" in r else r for r in refs}
    clash = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {r: r if short[r] in clash else short[r] for r in refs}


def format_rows(rows: list[dict]) -> str:
    """A small table for the terminal."""
    labels = model_labels(r["model"] for r in rows)
    width = max([len("model"), *map(len, labels.values())])
    lines = [f"{'model':<{width}} {'task':<26} {'lang':<5} {'metric':<32} {'value':>8} {'stderr':>8} {'n':>5}"]
    for r in rows:
        metric = f"{r['metric']},{r['filter']}" if r["filter"] != "none" else r["metric"]
        err = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"{labels[str(r['model'])]:<{width}} {r['task']:<26} {str(r['lang'] or '-'):<5} "
                     f"{metric:<32} {r['value']:>8.4f} {err:>8} {r['n'] or '':>5}")
    return "\n".join(lines)
