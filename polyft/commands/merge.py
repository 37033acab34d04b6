"""`polyft merge merge=<method>`: merge models (or LoRAs) into a product of the artifact store.

Reads top to bottom: `preflight` checks everything that can be checked from config.json
and the safetensors headers (a model merge) or the method's own `check` (an adapter-space
method: lorahub, flix_compose), before anything is written; `command` then finds the
product in the store or builds it: `merge_models` streams a model merge into a temporary
directory renamed into place when complete, an adapter method's `build` writes its LoRA.
Under an experiment, both act on each of its merges (the main one, then the baselines).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from polyft import console
from polyft.config.experiment import merge_cfg, merge_names
from polyft.errors import ConfigError, PolyftError
from polyft.merge import engine, io, registry
from polyft.merge.engine import MergeSpec, merge_models
from polyft.models.load import check_model_dir
from polyft.products import MERGED, REF_KEYS, MergeInputs, Refs, merge_inputs, merge_key, store
from polyft.runs import config_hash, rebase


def _check_dir(key: str, path: Path, allow_pickle: bool) -> None:
    if io.is_adapter_dir(path):
        if not (path / "adapter_model.safetensors").is_file():
            pickled = (path / "adapter_model.bin").is_file()
            raise PolyftError(f"{key}={path}: " + ("the adapter has only pickle weights (adapter_model.bin); "
                                                  "save it with safetensors" if pickled else
                                                  "no adapter_model.safetensors in the adapter directory"))
        conf = json.loads((path / "adapter_config.json").read_text())
        if conf.get("peft_type", "LORA") != "LORA" or conf.get("use_dora") or conf.get("lora_bias"):
            raise PolyftError(f"{key}={path}: only plain LoRA adapters can be folded in (not DoRA, LoRA "
                              f"bias or {conf.get('peft_type')}); merge the adapter with peft first")
        return
    check_model_dir(str(path), key, allow_pickle)


def preflight(cfg) -> None:
    """Everything that can be refused before a file is written: refs, checkpoint kinds,
    architecture, tensor names, shapes and dtypes, vocabularies, swap depths, output_dir.
    Under an experiment: each of its merges (the main one, then the baselines)."""
    if cfg.experts or cfg.baselines:
        for name in merge_names(cfg):
            _preflight_one(merge_cfg(cfg, name))
        return
    _preflight_one(cfg)


def _preflight_one(cfg) -> None:
    method = registry.get(cfg.merge.method)
    if method.product == "adapter":
        return method.check(cfg, Refs(cfg))
    inputs = merge_inputs(cfg)
    m = cfg.merge
    weighted = list(zip(inputs.keys, inputs.models)) + ([("merge.base", inputs.base)] if inputs.base else [])
    for key, path in weighted:
        _check_dir(key, path, cfg.allow_pickle)
        if str(path) in inputs.adapter_bases:
            _check_dir(f"{key} (its base model)", inputs.adapter_bases[str(path)], cfg.allow_pickle)
    if inputs.config_source is not None:
        src = inputs.adapter_bases.get(str(inputs.config_source), inputs.config_source)
        if not (Path(src) / "config.json").is_file():
            raise PolyftError(f"merge.config_source={inputs.config_source} holds no config.json")
    if inputs.tokenizer_source is not None:
        src = inputs.tokenizer_source
        if not (io.has_tokenizer(src) or io.has_tokenizer(Path(inputs.adapter_bases.get(str(src), src)))):
            raise PolyftError(f"merge.tokenizer_source={src} holds no tokenizer files (tokenizer.json, ...)")
    ckpts, base = engine.open_inputs(merge_spec(cfg, inputs))
    ckpts = ckpts + ([base] if base is not None else [])
    names = engine.compare_layouts([(f"{k}={p}", ck) for (k, p), ck in zip(weighted, ckpts)], m.vocab)
    if m.method == "layer_swap":
        n = engine.count_layers(names) or ckpts[0].config.get("num_hidden_layers") or 0
        used = m.bottom + m.top + m.transition_bottom + m.transition_top
        if used > n:
            raise ConfigError(f"merge.bottom + merge.top + merge.transition_bottom + merge.transition_top = "
                              f"{m.bottom} + {m.top} + {m.transition_bottom} + {m.transition_top} = {used} "
                              f"layers, but the models have {n}; the four zones must fit in {n} layers")
    if cfg.output_dir:
        target = Path(cfg.output_dir).resolve()
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and \
                store(cfg).find(MERGED, "", merge_key(cfg, inputs), target) is None:
            raise PolyftError(f"output_dir={target} exists and holds something else; remove it or "
                              "choose another path")


def merge_spec(cfg, inputs: MergeInputs) -> MergeSpec:
    """The library's view of the config: plain paths and values."""
    m = cfg.merge
    params = OmegaConf.to_container(m, resolve=True)
    for key in REF_KEYS:
        params.pop(key, None)
    return MergeSpec(method=m.method, models=inputs.models, base=inputs.base, params=params,
                     dtype=m.dtype, shard_size=io.parse_size(m.shard_size),
                     config_source=inputs.config_source, tokenizer_source=inputs.tokenizer_source,
                     vocab=m.vocab, adapter_bases=dict(inputs.adapter_bases),
                     allow_pickle=bool(cfg.allow_pickle),
                     labels=[f"{k}={p}" for k, p in zip(inputs.keys, inputs.models)])


def command(cfg, record) -> None:
    if cfg.experts or cfg.baselines:
        for name in merge_names(cfg):
            merge_one(merge_cfg(cfg, name), record)
        return
    merge_one(cfg, record)


def merge_one(cfg, record) -> None:
    method = registry.get(cfg.merge.method)
    name = cfg.merge.name or cfg.merge.method
    inputs = merge_inputs(cfg) if method.product == "model" else None
    key = merge_key(cfg, inputs)
    target = Path(cfg.output_dir).resolve() if cfg.output_dir else None
    record.extra["product"] = {"kind": MERGED, "name": name, "hash": config_hash(key)}
    since = []

    def make(build):
        since.append(console.started(f"merging {name} ({cfg.merge.method})"))
        if method.product == "adapter":
            result = method.build(cfg, build.dir, Refs(cfg))
            rebase(build.dir, build.dir, build.dir, cfg.output_root)  # relative to a base in the store
            build.manifest.update(method=cfg.merge.method, product="adapter", **result.get("manifest", {}))
            return result.get("metrics", {})
        result = merge_models(merge_spec(cfg, inputs), build.dir,
                              progress=lambda total: console.progress(total, f"merging {name}", unit="tensor"))
        build.manifest.update(method=cfg.merge.method, inputs=[str(p) for p in inputs.models],
                              base=str(inputs.base) if inputs.base else None, merge=result)
        return dict(merge_seconds=result["seconds"], tensors=result["tensors"],
                    copied_tensors=result["copied_tensors"], bytes=result["bytes"],
                    **(result.get("diagnostics") or {}))

    got = store(cfg).obtain(MERGED, name, key, make, target)
    if got.reused:
        record.add_artifact(MERGED, got.path, reused=True)
        console.echo(f"polyft: merge {name} already built: {got.path}")
        return
    record.metrics.update(got.result)
    record.add_artifact(MERGED, got.path, reused=False)
    console.done(since[0], f"merge {name} written to {got.path}")
