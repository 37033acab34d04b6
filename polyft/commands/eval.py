"""`polyft eval`: per-language scores of models and adapters through lm-evaluation-harness.

    polyft eval eval=mgsm eval.model=outputs/artifacts/adapter/tiny-llama-lora-<hash>
    polyft eval eval=demo eval.models=[base,PATH_A,PATH_B]      # one base load for all
    polyft eval -m eval.model=base,PATH_A                        # one run per model
    polyft eval eval=xnli eval.langs=[sw] eval.data_dir=DIR      # local copies, offline

Reads top to bottom: `check` (before Hydra makes a run directory) resolves the models,
resolves every task name and language, and decides where each task's data comes from,
refusing with one line anything that cannot run. `command` then, per model, finds or
builds one artifact (`eval/<model>-<suite>-<hash>/`: lm-eval's raw results.json, optional
samples/, results.jsonl rows, the task YAMLs that ran), loading each base model once.

Local data layout (eval.data_dir): see polyft/eval/data.py,
    <data_dir>/<hub id with / replaced by __>/<config or default>/<split>.jsonl
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from polyft import console, tracking
from polyft.config.experiment import eval_models
from polyft.config.schema import to_container
from polyft.data.formatting import check_chat_template
from polyft.errors import MissingArtifactError, PolyftError
from polyft.eval import flix
from polyft.eval.data import file_identity, is_hub_dataset, plan_data, write_demo_data
from polyft.eval.harness import (
    RESULTS_ROWS,
    evaluate,
    format_rows,
    read_rows,
    result_rows,
    write_results,
    write_task_dir,
)
from polyft.eval.models import HFModels, ModelRef, artifact_label, describe, identity, order_by_base, tokenizer_source
from polyft.eval.specs import TaskSpec, resolve_tasks
from polyft.eval.vllm_backend import VLLMModels, check_available, check_parallel
from polyft.models.load import is_offline, set_offline_env
from polyft.products import eval_refs, store
from polyft.products import resolve_ref as model_ref
from polyft.runs import ArtifactStore, config_hash, read_manifest

KIND = "eval"


def with_experiment_models(cfg):
    """Under an experiment, eval.models defaults to base, every expert and every merge."""
    if not (cfg.experts or cfg.baselines):
        return cfg
    stage = copy.deepcopy(cfg)
    with open_dict(stage):
        stage.eval.models = eval_models(cfg)
    return stage


def resolve_ref(cfg, ref: str, build: bool = True) -> str:
    """The directory (or hub id, for `base`) a model reference names: base, an expert or a
    merge of the experiment, or a path (polyft.products.resolve_ref)."""
    try:
        return str(model_ref(cfg, ref, build=build))
    except MissingArtifactError:
        raise
    except PolyftError as exc:
        raise PolyftError(f"eval.model={exc}") from None


@dataclass
class Plan:
    models: list[ModelRef]
    specs: list[TaskSpec]
    store: ArtifactStore
    targets: dict  # ref -> output directory, or None for the artifact store


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def artifact_name(cfg, m: ModelRef) -> str:
    return f"{_slug(artifact_label(m, cfg.model.name))}-{_slug(cfg.eval.suite)}"


def plan(cfg, build: bool = True) -> Plan:
    e = cfg.eval
    offline = is_offline(cfg.offline)
    if offline:
        set_offline_env()  # before datasets/huggingface_hub are imported: fail fast, no retries
    if e.backend == "vllm" and cfg.quant.bits:
        raise PolyftError(f"quant={cfg.quant.name} is for eval.backend=hf; vLLM loads its own quantised weights")
    models = [describe(ref, resolve_ref(cfg, ref, build), allow_pickle=cfg.allow_pickle, offline=offline)
              for ref in eval_refs(cfg)]
    if e.backend == "vllm":
        check_parallel(models, e.tensor_parallel_size, e.data_parallel_size)
        check_available()
    specs = resolve_tasks(list(OmegaConf.to_container(e.tasks, resolve=True)),
                          langs=list(e.langs) if e.langs else None, include_path=e.include_path,
                          num_fewshot=e.num_fewshot, limit=e.limit,
                          apply_chat_template=e.apply_chat_template)
    if any(s.chat for s in specs):  # a template is never invented: the model's own, or `plain`
        if e.backend == "vllm" and cfg.model.chat_template == "plain":
            raise PolyftError("model.chat_template=plain is for eval.backend=hf; vLLM renders chat "
                              "prompts with the model's own template")
        for m in models:
            check_chat_template(tokenizer_source(m), cfg.model.chat_template)
    plan_data(specs, data_dir=e.data_dir, demo_root=Path(cfg.output_root) / "eval-data" / "demo",
              offline=offline, xtremeup_root=e.xtremeup_root)
    if any(m.kind == "flix" for m in models):
        if e.backend != "hf":
            raise PolyftError("eval.backend=vllm cannot score a FLix adapter directly; compose it with "
                              "polyft merge merge=flix_compose and evaluate that LoRA")
        flix.check(models, specs)
    targets: dict = dict.fromkeys(eval_refs(cfg))
    if cfg.output_dir:
        out = Path(cfg.output_dir).expanduser().resolve()
        for m in models:  # one model: output_dir is its artifact; several: one subdirectory each
            targets[m.ref] = out if len(models) == 1 else out / artifact_name(cfg, m)
    return Plan(models, specs, store(cfg), targets)


def preflight(cfg) -> None:
    """Everything that can be refused before a directory is made (no torch, no lm-eval)."""
    p = plan(with_experiment_models(cfg), build=False)
    for target in p.targets.values():
        if target is not None and target.exists() and any(target.iterdir()):
            manifest = read_manifest(target)
            if not manifest or manifest.get("kind") != KIND:
                raise PolyftError(f"output_dir={target} exists and holds something else; remove it or "
                                  "choose another path")


def _device_type(cfg) -> str:
    if cfg.eval.device:
        return str(cfg.eval.device).split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_key(cfg, m: ModelRef, specs: list[TaskSpec]) -> dict:
    """What the scores depend on: tasks and their data, the model, and how it is run."""
    e = cfg.eval
    tasks = []
    for s in specs:
        generated = s.family is not None and s.family.generator is not None
        tasks.append({
            "name": s.name, "lang": s.lang, "limit": s.limit, "num_fewshot": s.num_fewshot, "chat": s.chat,
            "config": config_hash(s.config, 16),
            "overrides": {k: v for k, v in s.overrides.items() if k != "dataset_kwargs"},
            # demo files are named by a digest of the code and settings that generate them
            "data": sorted(s.data_files.values()) if generated else
            [file_identity(f) for f in sorted(s.data_files.values())],
            "hub": [s.get("dataset_path"), s.get("dataset_name")] if is_hub_dataset(s) else None,
            **({"feature": s.task} if s.task else {}),
        })
    quant = OmegaConf.to_container(cfg.quant, resolve=True) if cfg.quant.bits else None
    # vLLM's numbers may move with the engine layout (sharded matmuls, batching); HF placement
    # runs each layer whole on some GPU, the same computation. A layout other than one engine
    # is named only when used, so the keys of earlier results still match.
    parallel = ({"tensor_parallel_size": e.tensor_parallel_size, "data_parallel_size": e.data_parallel_size}
                if e.backend == "vllm" and (e.tensor_parallel_size, e.data_parallel_size) != (1, 1) else None)
    return {**({"parallel": parallel} if parallel else {}), "suite": e.suite, "tasks": tasks, "model": identity(m),
            "load": {"dtype": cfg.model.dtype, "revision": cfg.model.revision, "quant": quant,
                     "trust_remote_code": cfg.model.trust_remote_code,
                     **({"attn_implementation": a} if (a := cfg.model.get("attn_implementation")) else {})},
            "backend": e.backend, "device": _device_type(cfg), "chat_template": chat_template(cfg, specs),
            "dtype_auto": "checkpoint",  # model.dtype=auto loads config.json's dtype, as lm-eval does
            "gen_kwargs": OmegaConf.to_container(e.gen_kwargs, resolve=True), "log_samples": e.log_samples,
            "lm_eval": metadata.version("lm-eval")}


def chat_template(cfg, specs: list[TaskSpec]) -> str | None:
    """model.chat_template when some task renders its prompts as chat turns, else None."""
    return cfg.model.chat_template if any(s.chat for s in specs) else None


def _models(cfg, p: Plan):
    e = cfg.eval
    if e.backend == "vllm":
        return VLLMModels(p.models, dtype=cfg.model.dtype, batch_size=e.batch_size,
                          trust_remote_code=cfg.model.trust_remote_code, seed=cfg.seed,
                          tensor_parallel_size=e.tensor_parallel_size, data_parallel_size=e.data_parallel_size)
    return HFModels(cfg.model, cfg.quant, allow_pickle=cfg.allow_pickle, device=e.device,
                    batch_size=e.batch_size, apply_chat_template=any(s.chat for s in p.specs),
                    parallelize=e.parallelize, max_memory_per_gpu=e.max_memory_per_gpu,
                    max_cpu_memory=e.max_cpu_memory)


def evaluate_model(cfg, p: Plan, m: ModelRef, backend, build) -> list[dict]:
    """Score one model on the suite into build.dir; returns its rows."""
    e = cfg.eval
    task_dir = write_task_dir(p.specs, build.dir / "tasks")

    def score(model_ref, specs):
        results = evaluate(backend.lm(model_ref), specs, task_dir,
                           gen_kwargs=OmegaConf.to_container(e.gen_kwargs, resolve=True),
                           log_samples=e.log_samples)
        return results, result_rows(results, m.ref, {s.name: s.lang for s in specs})

    if m.kind == "flix":  # one composed LoRA per feature set (polyft/eval/flix.py)
        results, rows = flix.evaluate(m, p.specs, build.dir, score)
    else:
        results, rows = score(m, p.specs)
    write_results(build.dir, results, rows)
    build.manifest.update(model=asdict(m), suite=e.suite, tasks=[s.name for s in p.specs],
                          chat_template=chat_template(cfg, p.specs))
    return rows


def command(cfg, record, show_rows: bool = True) -> None:
    """Every (model, suite) result of the plan, reused or computed, into record.metrics;
    `show_rows=False` when the caller prints a report table instead of the rows."""
    cfg = with_experiment_models(cfg)
    p = plan(cfg)
    for spec in p.specs:
        if spec.family is not None and spec.family.generator:
            write_demo_data(spec)
    record.extra["eval"] = {
        "suite": cfg.eval.suite, "models": [asdict(m) for m in p.models],
        "chat_template": chat_template(cfg, p.specs),
        "tasks": [{"name": s.name, "lang": s.lang, "limit": s.limit, "num_fewshot": s.fewshot,
                   "apply_chat_template": s.chat, "data_files": s.data_files} for s in p.specs]}
    backend = []  # nothing heavy is loaded when all results exist
    rows_by_ref: dict[str, list[dict]] = {}
    computed = []
    for m in order_by_base(p.models):
        since = []

        def make(build, m=m):
            since.append(console.started(f"evaluating {m.ref} on {cfg.eval.suite}"))
            backend[:] = backend or [_models(cfg, p)]
            return evaluate_model(cfg, p, m, backend[0], build)

        got = p.store.obtain(KIND, artifact_name(cfg, m), eval_key(cfg, m, p.specs), make, p.targets[m.ref])
        record.add_artifact(KIND, got.path, reused=got.reused, model=m.ref, suite=cfg.eval.suite)
        if got.reused:
            rows = [{**r, "model": m.ref} for r in read_rows(got.path / RESULTS_ROWS)]
            console.echo(f"polyft: eval of {m.ref} on {cfg.eval.suite} already done: {got.path}")
        else:
            rows = got.result
            computed.append(m.ref)
            console.done(since[0], f"eval of {m.ref} on {cfg.eval.suite} written to {got.path}")
        rows_by_ref[m.ref] = rows
    record.metrics["results"] = [r for ref in eval_refs(cfg) for r in rows_by_ref[ref]]
    if computed:  # a tracked run for work done: a rerun that reuses every result adds none
        info = tracking.log_eval(cfg.logger, record.run_dir, tracked_run(cfg, p, record), record.metrics["results"])
        if info:
            record.extra.setdefault("tracking", []).append(info)
    record.save()
    if show_rows and not record.extra.get("sweep"):  # a sweep's tables come once, at its end
        console.echo(format_rows(record.metrics["results"]))


def tracked_run(cfg, p: Plan, record) -> tracking.Tracked:
    """The tracked run of an evaluation, in the group of the runs of the models it scores (the
    experiment's, or the sweep's); `scored` names each model's product, which is also the
    name of its training's run."""
    sweep = record.extra.get("sweep")
    label = cfg.exp_name or (_slug(artifact_label(p.models[0], cfg.model.name)) if len(p.models) == 1
                             else f"{len(p.models)}-models")
    name = f"eval-{_slug(cfg.eval.suite)}-{label}" + (sweep["point"].split()[0] if sweep else "")
    config = {k: v for k, v in to_container(cfg).items() if k != "expert_root"}
    scored = {m.ref: {"path": m.path, "product": Path(m.path).name if m.ref != "base" else None, "kind": m.kind}
              for m in p.models}
    return tracking.Tracked(name, tracking.group_name(cfg.exp_name, cfg.command, sweep), "eval",
                            {"polyft": config, "scored": scored, **({"sweep_point": sweep["point"]} if sweep else {})})
