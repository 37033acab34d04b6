"""`polyft merge merge=<method>`: merge models into a product of the artifact store.

Reads top to bottom: turn the refs in the config into directories (`resolve_ref`), check
everything that can be checked from config.json and the safetensors headers (`check`,
which the CLI runs before anything is written), then find the product in the artifact
store or build it with `merge_models` into a temporary directory that is renamed into
place when complete. torch is imported only by the merge itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from polyft import console
from polyft.errors import ConfigError, MissingArtifactError, PolyftError
from polyft.runs import ArtifactStore, config_hash, fingerprint, read_manifest

KIND = "merged"
REF_KEYS = ("models", "base", "middle", "outer", "config_source", "tokenizer_source")


def resolve_ref(cfg, ref, build: bool = True) -> Path:
    """The directory a model reference names: `base` (the configured model), an expert or a
    merge of the experiment (its product in the store), or a path. Merges of merges resolve
    recursively; adapter-space methods get this function to resolve their own refs."""
    exp = cfg.exp_name or "EXP"
    if ref == "base":
        from polyft.models.load import resolve_model_path

        return Path(resolve_model_path(cfg.model, cfg.output_root, cfg.offline, build=build))
    if ref in cfg.experts:
        from polyft.commands.train import expert_product

        return expert_product(cfg, ref)
    if cfg.experts or cfg.baselines:
        from polyft.config.experiment import merge_cfg, merge_names

        if ref in merge_names(cfg):
            found = find_merged(merge_cfg(cfg, ref))
            if found is None:
                raise MissingArtifactError(f"merge '{ref}' is not made yet; run: polyft merge +exp={exp}")
            return found
    path = Path(os.path.expanduser(str(ref)))
    if path.exists():
        return path.resolve()
    if cfg.experts or cfg.baselines:
        from polyft.config.experiment import merge_names

        known = ", ".join(["base", *cfg.experts, *merge_names(cfg)])
        raise PolyftError(f"{ref}: no such path, and not one of exp={exp}'s models ({known})")
    raise PolyftError(f"{ref}: no such model or adapter directory; use base or a path")


def find_merged(cfg) -> Path | None:
    """The store's product of the merge `cfg.merge`, if made (its inputs must exist)."""
    from polyft.adapters import lora as adapter_space

    if adapter_space.is_adapter_method(cfg.merge.method):
        key = adapter_space.method_module(cfg.merge.method).product_key(cfg, resolve_ref)
    else:
        key = product_key(cfg, resolve_inputs(cfg))
    return ArtifactStore(Path(cfg.output_root) / "artifacts").find(KIND, cfg.merge.name or cfg.merge.method, key)


@dataclass
class Inputs:
    models: list[Path]  # in method order (layer_swap: middle, outer)
    keys: list[str]  # the config key of each model, for messages
    base: Path | None = None
    config_source: Path | None = None
    tokenizer_source: Path | None = None
    adapter_bases: dict = field(default_factory=dict)  # adapter dir -> base dir

    def all(self) -> list[tuple[str, Path]]:
        out = list(zip(self.keys, self.models))
        for key in ("base", "config_source", "tokenizer_source"):
            if getattr(self, key) is not None:
                out.append((f"merge.{key}", getattr(self, key)))
        return out


def _ref(cfg, key: str, ref) -> Path:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{key}={ref}: expected a path to a model or adapter directory")
    try:
        return resolve_ref(cfg, ref)
    except PolyftError as exc:
        raise PolyftError(f"{key}: {exc}") from None


def resolve_inputs(cfg) -> Inputs:
    """The directories the merge reads, after the presence rules of its method."""
    from polyft.merge import io, registry

    m = cfg.merge
    method = registry.get(m.method)
    if method.name == "layer_swap":
        if m.models:
            raise ConfigError("merge=layer_swap takes merge.middle and merge.outer, not merge.models")
        for key in ("middle", "outer"):
            if not m.get(key):
                raise ConfigError(f"merge.{key} is missing; merge=layer_swap needs merge.middle (the model "
                                  "keeping its middle layers) and merge.outer (giving bottom and top layers)")
        refs = [("merge.middle", m.middle), ("merge.outer", m.outer)]
    else:
        refs = [(f"merge.models[{i}]", r) for i, r in enumerate(m.models or [])]
        if len(refs) < method.min_models or (method.max_models and len(refs) > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}")
            raise ConfigError(f"merge.models has {len(refs)} models; merge={method.name} needs {want}")
    if method.needs_base and not m.base:
        raise ConfigError(f"merge.base is missing; merge={method.name} works on task vectors "
                          "(model - base) and needs the base model: merge.base=PATH")
    if m.weights is not None and method.name != "layer_swap" and len(m.weights) != len(refs):
        raise ConfigError(f"merge.weights has {len(m.weights)} entries for {len(refs)} models; "
                          "give one per model")
    inputs = Inputs([_ref(cfg, k, r) for k, r in refs], [k for k, _ in refs])
    if method.needs_base:
        inputs.base = _ref(cfg, "merge.base", m.base)
    if m.config_source:
        inputs.config_source = _ref(cfg, "merge.config_source", m.config_source)
    if m.tokenizer_source:
        inputs.tokenizer_source = _ref(cfg, "merge.tokenizer_source", m.tokenizer_source)
    for key, path in inputs.all():
        if io.is_adapter_dir(path) and str(path) not in inputs.adapter_bases:
            base = io.adapter_base_ref(path)
            if not base:
                raise PolyftError(f"{key}={path}: adapter_config.json names no base_model_name_or_path")
            inputs.adapter_bases[str(path)] = _ref(cfg, f"{key} (its base model)", base)
    return inputs


def _check_dir(key: str, path: Path, allow_pickle: bool) -> None:
    from polyft.merge import io
    from polyft.models.load import check_model_dir

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


def check(cfg) -> None:
    """Everything that can be refused before a file is written: refs, checkpoint kinds,
    architecture, tensor names, shapes and dtypes, vocabularies, swap depths, output_dir."""
    from polyft.adapters import lora as adapter_space
    from polyft.merge import engine, io

    if adapter_space.is_adapter_method(cfg.merge.method):
        return adapter_space.check(cfg, resolve_ref)

    inputs = resolve_inputs(cfg)
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
                _same_product(target, product_key(cfg, inputs)) is None:
            raise PolyftError(f"output_dir={target} exists and holds something else; remove it or "
                              "choose another path")


def merge_spec(cfg, inputs: Inputs):
    """The library's view of the config: plain paths and values."""
    from omegaconf import OmegaConf

    from polyft.merge import io
    from polyft.merge.engine import MergeSpec

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


def product_key(cfg, inputs: Inputs) -> dict:
    """The part of the config that determines the merged weights, and the inputs' identity."""
    from omegaconf import OmegaConf

    from polyft.merge import registry

    m = OmegaConf.to_container(cfg.merge, resolve=True)
    method = registry.get(m["method"])
    merge = {k: m[k] for k in ("method", "dtype", "shard_size", "vocab", *method.config_keys())}
    resolved = dict(inputs.all())
    for key in ("base", "config_source", "tokenizer_source"):
        merge[key] = str(resolved[f"merge.{key}"]) if f"merge.{key}" in resolved else None
    merge["models"] = [str(p) for p in inputs.models]
    paths = {str(p) for _, p in inputs.all()} | {str(p) for p in inputs.adapter_bases.values()}
    return {"merge": merge, "inputs": {p: fingerprint(Path(p)) for p in sorted(paths)}}


def _same_product(target: Path, key: dict) -> Path | None:
    manifest = read_manifest(target)
    return target if manifest and manifest.get("hash") == config_hash(key) else None


def command(cfg, record) -> None:
    from polyft.adapters import lora as adapter_space
    from polyft.merge.engine import merge_models

    if adapter_space.is_adapter_method(cfg.merge.method):
        return adapter_space.command(cfg, record, KIND, resolve_ref)
    check(cfg)
    inputs = resolve_inputs(cfg)
    name = cfg.merge.name or cfg.merge.method
    key = product_key(cfg, inputs)
    store = ArtifactStore(Path(cfg.output_root) / "artifacts")
    target = Path(cfg.output_dir).resolve() if cfg.output_dir else None
    record.extra["product"] = {"kind": KIND, "name": name, "hash": config_hash(key)}
    with store.lock(KIND, name, key):
        found = _same_product(target, key) if target else store.find(KIND, name, key)
        if found is not None:
            record.add_artifact(KIND, found, reused=True)
            console.echo(f"polyft: merge {name} already built: {found}")
            return
        since = console.started(f"merging {name} ({cfg.merge.method})")
        with store.build(KIND, name, key, target=target) as build:
            result = merge_models(merge_spec(cfg, inputs), build.dir,
                                  progress=lambda total: console.progress(total, f"merging {name}", unit="tensor"))
            build.manifest.update(method=cfg.merge.method, inputs=[str(p) for p in inputs.models],
                                  base=str(inputs.base) if inputs.base else None, merge=result)
    record.metrics.update(merge_seconds=result["seconds"], tensors=result["tensors"],
                          copied_tensors=result["copied_tensors"], bytes=result["bytes"],
                          **(result.get("diagnostics") or {}))
    record.add_artifact(KIND, build.dir, reused=False)
    console.done(since, f"merge {name} written to {build.dir}")
