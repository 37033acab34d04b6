"""The rules a type cannot say, on a composed config: pure (no file, data or hub access).

`validate(cfg)` is the one entry point: the groups the command uses, then an experiment's
structure (polyft.config.experiment). What needs files (model directories, data sources,
checkpoint headers) is each command's `preflight` (polyft.commands), run after this.
Merge methods check their own parameters beside their maths (polyft.merge.registry).
"""

from __future__ import annotations

import math
import re

from omegaconf import DictConfig

from polyft.adapters.flix import FEATURE_TYPES
from polyft.checks import choice
from polyft.config import experiment, values
from polyft.data.synthetic import GENERATORS, LANGS
from polyft.data.xtremeup import LAYOUT, SPLITS, TASKS
from polyft.errors import ConfigError, PolyftError
from polyft.merge import registry
from polyft.merge.io import parse_size
from polyft.sharding import deepspeed_names

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate(cfg: DictConfig) -> None:
    """Every rule for a composed run point, before anything is read or written."""
    validate_groups(cfg)
    if cfg.experts or cfg.baselines:
        experiment.validate_structure(cfg, validate_groups)


def _check_flix(a) -> None:
    if not a.features:
        raise ConfigError(f"adapter.features is empty; name feature types: {', '.join(FEATURE_TYPES)}")
    for ftype in [*a.features, *a.ranks, *(a.alpha if isinstance(a.alpha, (dict, DictConfig)) else {})]:
        if ftype not in FEATURE_TYPES:
            raise ConfigError(f"adapter: unknown feature type {ftype}; FLix features are row fields: "
                              f"{', '.join(FEATURE_TYPES)}")
    if len(set(a.features)) != len(a.features):
        raise ConfigError(f"adapter.features={list(a.features)} names a feature type twice")
    for ftype in a.features:
        r = a.ranks.get(ftype)
        if r is None or r <= 0:
            raise ConfigError(f"adapter.ranks.{ftype}={r} is not allowed; each feature type needs a rank > 0")
        alpha = a.alpha.get(ftype) if isinstance(a.alpha, (dict, DictConfig)) else a.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"adapter.alpha.{ftype}={alpha} is not allowed; each feature type needs alpha > 0")
    if not 0 <= a.feature_dropout < 1:
        raise ConfigError(f"adapter.feature_dropout={a.feature_dropout} is not allowed; it must be in [0, 1)")


def _check_alpha_ratio(a) -> None:
    ratio = a.alpha_ratio
    if ratio is None or a.type == "full":  # full fine-tuning has no alpha: ignored, as alpha is
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or math.isinf(ratio):
        raise ConfigError(f"adapter.alpha_ratio={ratio} is not allowed; use a number > 0 (alpha = ratio * r), "
                          "or null for the fixed adapter.alpha")
    if a.type == "flix":
        raise ConfigError(f"adapter.alpha_ratio={ratio} is not allowed with adapter=flix, whose alpha is per "
                          "feature type (adapter.alpha.<type>); set adapter.alpha_ratio=null")
    if a.match:
        raise ConfigError(f"adapter.alpha_ratio={ratio} is not allowed with adapter.match={a.match}, which sets "
                          "alpha from the FLix expert's scale; set adapter.alpha_ratio=null")


def _check_adapter(a) -> None:
    _check_alpha_ratio(a)
    if a.type == "flix":
        _check_flix(a)
    elif a.type != "full":
        if not a.match and a.alpha_ratio is None and (
                isinstance(a.alpha, bool) or not isinstance(a.alpha, (int, float)) or a.alpha <= 0):
            raise ConfigError(f"adapter.alpha={a.alpha} is not allowed; it must be a number > 0 "
                              "(or set adapter.alpha_ratio: alpha = ratio * r)")


def _check_quant(q) -> None:
    if q.quant_storage is not None and q.bits != 4:
        raise ConfigError(f"quant.quant_storage={q.quant_storage} is for 4-bit bases (quant=4bit); "
                          "set quant.quant_storage=null")


def check_data(d) -> None:
    values.check_group("data", d)  # also for a data mapping read on its own (LoraHub's shots)
    if not d.sources:
        raise ConfigError(f"data={d.name} has no sources; add at least one under data.sources")
    if all(s.validation for s in d.sources.values()):
        raise ConfigError(f"data={d.name}: every source has validation=true; at least one source must be "
                          "trained on")
    for name, s in d.sources.items():
        key = f"data.sources.{name}"
        if s.type == "synthetic":
            choice(f"{key}.generator", s.generator, GENERATORS)
            for lang in s.langs:
                choice(f"{key}.langs", lang, LANGS)
            if s.n <= 0:
                raise ConfigError(f"{key}.n={s.n} is not allowed; synthetic sources need n > 0")
        elif s.type == "xtremeup":
            if not s.path:  # data=xtremeup takes it from eval.xtremeup_root
                raise ConfigError(f"{key}.path is missing; an xtremeup source needs the release root "
                                  f"({LAYOUT}); with data=xtremeup set eval.xtremeup_root=DIR")
            choice(f"{key}.task", s.task, TASKS)
            choice(f"{key}.split", s.split, SPLITS)
        elif not s.path:
            raise ConfigError(f"{key}.path is missing; a {s.type} source needs a path or dataset id")
        if s.data_files is not None and s.type not in ("hub", "jsonl", "parquet", "csv"):
            raise ConfigError(f"{key}.data_files={s.data_files} is not allowed with type={s.type}; it names a "
                              "file of a hub dataset, or of the local directory in path (jsonl, parquet, csv)")


def _check_train(t) -> None:
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise ConfigError("train.max_steps must be > 0 (or -1 with train.epochs > 0)")
    _check_sharding(t)


def has_validation(d) -> bool:
    return bool(d.validation_ratio) or any(s.validation for s in d.sources.values())


def _check_name(name) -> None:
    """A product name is one directory-name part."""
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ConfigError(f"name={name} is not allowed; a product name takes letters, digits, '.', '_' "
                          "and '-' (it becomes a directory name, followed by the config hash)")


def _check_sharding(t) -> None:
    shipped = ", ".join(deepspeed_names())
    if t.distributed == "deepspeed" and not t.deepspeed_config:
        raise ConfigError(f"train.distributed=deepspeed needs train.deepspeed_config: a shipped config "
                          f"({shipped}) or a DeepSpeed JSON file")
    if t.deepspeed_config and t.distributed != "deepspeed":
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} is only read with "
                          f"train.distributed=deepspeed (it is {t.distributed}); set one or the other")
    f = t.fsdp
    if f.wrap_layer_cls is not None and (not f.wrap_layer_cls or not all(
            isinstance(c, str) and c.strip() for c in f.wrap_layer_cls)):
        raise ConfigError(f"train.fsdp.wrap_layer_cls={f.wrap_layer_cls} is not allowed; name module "
                          "classes (e.g. [LlamaDecoderLayer]) or null for the model's decoder layer")


def _check_merge(m) -> None:
    """The engine's keys here; each method checks its own parameters (polyft.merge.registry)."""
    method = registry.get(m.method)
    if method.rules is not None:
        method.rules(m)


def _check_eval_parallel(e) -> None:
    """Several GPUs: vLLM's tensor/data parallel sizes, or the HF model spread over devices."""
    for key in ("tensor_parallel_size", "data_parallel_size"):
        v = e[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"eval.{key}={v} is not allowed; it must be an integer >= 1")
        if v > 1 and e.backend != "vllm":
            raise ConfigError(f"eval.{key}={v} is for eval.backend=vllm; with eval.backend=hf spread the "
                              "model over the GPUs with eval.parallelize=true")
    if e.parallelize and e.backend != "hf":
        raise ConfigError("eval.parallelize=true is for eval.backend=hf; vLLM spreads a model with "
                          "eval.tensor_parallel_size")
    if e.parallelize and e.device:
        raise ConfigError(f"eval.device={e.device} is not allowed with eval.parallelize=true, which places the "
                          "model over every visible GPU; choose them with CUDA_VISIBLE_DEVICES")
    for key in ("max_memory_per_gpu", "max_cpu_memory"):
        v = e[key]
        if v is None:
            continue
        if not e.parallelize:
            raise ConfigError(f"eval.{key}={v} is only used with eval.parallelize=true; set it, or {key}=null")
        try:
            ok = not isinstance(v, bool) and parse_size(v) > 0
        except PolyftError:
            ok = False
        if not ok:
            raise ConfigError(f"eval.{key}={v} is not allowed; give a size such as 70GiB or 40GB")


def _check_eval(e) -> None:
    """Rules for the eval group (task names, languages, models and data: polyft.commands.eval)."""
    _check_eval_parallel(e)
    if not e.tasks:
        raise ConfigError(f"eval={e.suite} has no tasks; list them under eval.tasks")
    refs = list(e.models) if e.models is not None else [e.model]
    if not refs or any(not isinstance(r, str) or not r.strip() for r in refs):
        raise ConfigError("eval.model / eval.models: give base or model/adapter paths")
    if len(set(refs)) != len(refs):
        raise ConfigError(f"eval.models lists a model twice: {', '.join(refs)}")
    if e.langs is not None and not e.langs:
        raise ConfigError("eval.langs is empty; give languages (e.g. [sw, te]) or null for all")


def _check_plan(p) -> None:
    for size in p.gres:
        if not str(size).isdigit() or int(size) not in p.gpus:
            raise ConfigError(f"plan.gres.{size}: not one of plan.gpus ({', '.join(map(str, p.gpus))})")


def _check_full_quant(cfg) -> None:
    """train refuses it, and plan too, so that no plan is made for a run that cannot start."""
    if cfg.adapter.type == "full" and cfg.quant.bits:
        raise ConfigError(f"quant={cfg.quant.name} needs an adapter; full fine-tuning of a "
                          "quantised base is not possible (use adapter=lora)")


def _check_flix_data(cfg) -> None:
    if cfg.adapter.type == "flix" and cfg.data.packing:
        raise ConfigError("data.packing=true is not allowed with adapter=flix; packed sequences would mix "
                          "the features of several examples")
    if cfg.adapter.type == "flix" and cfg.merge_back:
        raise ConfigError("merge_back=true is not allowed with adapter=flix; merge one feature set with "
                          "polyft merge merge=flix_compose instead")
    if cfg.adapter.match and cfg.adapter.type != "lora":
        raise ConfigError(f"adapter.match={cfg.adapter.match} is for adapter=lora in an experiment whose experts include {cfg.adapter.match} (adapter=flix)")


def _check_sharded_quant(cfg) -> None:
    t = cfg.train
    if t.num_processes > 1 and t.distributed == "fsdp" and cfg.quant.bits == 8:
        raise ConfigError("quant=8bit cannot be sharded by train.distributed=fsdp (FSDP shards float "
                          "tensors); use quant=4bit, whose packed weights it shards, or train.distributed=ddp")


def validate_groups(cfg: DictConfig) -> None:
    """Every key's value (polyft.config.values), then the rules between keys of the groups
    the command uses. Raises ConfigError (one line)."""
    values.check_values(cfg)
    if cfg.command == "plan" or cfg.plan.fit:
        _check_plan(cfg.plan)
    if cfg.command in ("train", "run", "plan"):
        _check_adapter(cfg.adapter)
        _check_quant(cfg.quant)
        check_data(cfg.data)
        _check_flix_data(cfg)
        _check_full_quant(cfg)
        _check_train(cfg.train)
        _check_name(cfg.get("name"))
        if cfg.train.eval_steps is not None and not has_validation(cfg.data):
            raise ConfigError(f"train.eval_steps={cfg.train.eval_steps}: data={cfg.data.name} has no validation "
                              "set; set data.validation_ratio (e.g. 0.05) or a source with validation=true")
        _check_sharded_quant(cfg)
    if cfg.command in ("merge", "run"):
        _check_merge(cfg.merge)
    if cfg.command in ("eval", "run"):
        _check_eval(cfg.eval)
    if cfg.command in ("report", "run") and cfg.report.compare is not None and not str(cfg.report.compare).strip():
        raise ConfigError("report.compare is empty; name a table row (e.g. report.compare=base), or leave it unset")


