"""Products: what each command makes or reads, named and keyed, and the refs that name them.

A trained model or adapter, a merge and an eval result each live in the artifact store
(polyft.runs) under `<kind>/<name>-<hash of its key>`. Here: the keys (the part of the config
that determines a product), where a product is (`*_plan`, `find_merged`, `expert_product`),
and the refs of an experiment (`resolve_ref`: base, an expert, a merge or a path). Nothing
here trains, merges or evaluates; it reads manifests, config.json files and, for an
adapter sized to a FLix expert, the expert's data (its feature values).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from polyft.adapters.flix import feature_values
from polyft.config.experiment import expert_cfg, merge_cfg, merge_names, unproduced_refs
from polyft.config.rules import check_data
from polyft.config.schema import DataConfig, option_file
from polyft.data.formatting import ENCODING
from polyft.data.mixture import load_mixture
from polyft.errors import ConfigError, MissingArtifactError, PolyftError
from polyft.merge import io, registry
from polyft.models.load import builds_tiny, is_offline, resolve_model_path
from polyft.models.names import slug
from polyft.runs import ArtifactStore, config_hash, fingerprint, read_manifest
from polyft.training import lora_alpha

MERGED = "merged"  # the store kind of merges
_LOG_ONLY = ("logging_steps", "name", "eval_steps", "save_total_limit")
# Keys added after products were stored: left out of the key at their default, so that every
# product made before keeps its hash.
_NEW_DATA = {"validation_ratio": 0.0}
_NEW_SOURCE = {"messages_field": None, "system": None, "validation": False}


def _without_defaults(d: dict, defaults: dict) -> dict:
    return {k: v for k, v in d.items() if not (k in defaults and v == defaults[k])}


def data_key(data_cfg) -> dict:
    d = _without_defaults(OmegaConf.to_container(data_cfg, resolve=True), _NEW_DATA)
    d["sources"] = {n: _without_defaults(s, _NEW_SOURCE) for n, s in d["sources"].items()}
    return d
REF_KEYS = ("models", "base", "middle", "outer", "config_source", "tokenizer_source")


def store(cfg) -> ArtifactStore:
    return ArtifactStore(Path(cfg.output_root) / "artifacts")


# ---------------------------------------------------------------- trained models and adapters

@dataclass
class TrainPlan:
    model_path: str
    kind: str  # adapter | model
    name: str
    key: dict
    store: ArtifactStore
    target: Path | None


def product_name(cfg) -> str:
    """The readable part of a trained product's directory name (the hash follows it): an
    expert's name, the user's `name=`, else <model>-<adapter and rank>[-<quant>]-<data>,
    e.g. tiny-llama-lora-r8-demo. Not part of the key: renaming never retrains."""
    if cfg.get("expert"):
        return str(cfg.expert)
    if cfg.get("name"):
        return str(cfg.name)
    a = cfg.adapter
    if a.type == "full":
        adapter = "full"
    elif a.type == "flix":
        adapter = "flix-" + "-".join(f"{t}{a.ranks[t]}" for t in a.features if t in a.ranks)
    else:
        adapter = f"{'dora' if a.dora else 'lora'}-r{a.r}"
    quant = f"-{cfg.quant.name}" if cfg.quant.bits else ""
    return slug(f"{cfg.model.name}-{adapter}{quant}-{cfg.data.name}")


def run_name(p: TrainPlan) -> str:
    """What a trained product is called outside the store (its W&B run, its TensorBoard
    directory): the name of its store directory, so a run and its product find each other."""
    return p.store.path_for(p.kind, p.name, p.key).name


def train_key(cfg, model_path: str) -> dict:
    """The part of the config that determines the trained weights (not logging, not paths)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["resolved"] = None if builds_tiny(cfg.model) else model_path
    if model.get("chat_template") == "model":  # the default: product hashes stay as they were
        del model["chat_template"]
    if model.get("attn_implementation") is None:  # likewise
        model.pop("attn_implementation", None)
    key = {"model": model, "quant": OmegaConf.to_container(cfg.quant, resolve=True),
           "data": data_key(cfg.data),
           "train": {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                     if k not in _LOG_ONLY},
           "seed": cfg.seed, "merge_back": cfg.merge_back, "encoding": ENCODING}
    key["adapter"] = adapter_key(cfg.adapter)
    # how the work is laid out over processes, not what it computes: product hashes stay as they were
    key["train"].pop("fsdp", None)
    if key["quant"].get("quant_storage") is None:
        key["quant"].pop("quant_storage", None)
    return key


FLIX_ONLY = ("features", "ranks", "feature_dropout")
LORA_ONLY = ("r", "rslora", "dora", "match")


def adapter_key(adapter) -> dict:
    """The adapter settings that shape the weights: only those of its type (a LoRA's key is
    what it was before FLix existed; match is already folded into r and alpha)."""
    if adapter.type == "full":
        return {"type": "full"}
    a = OmegaConf.to_container(adapter, resolve=True)
    if a["type"] == "flix":
        return {k: v for k, v in a.items() if k not in LORA_ONLY + ("alpha_ratio",)}
    a = {k: v for k, v in a.items() if k not in FLIX_ONLY + ("match", "alpha_ratio")}
    # the alpha the weights are trained with, however it was given: a ratio at r=64 and the
    # same alpha given as a number are one product, and keys made before the ratio stay valid
    a["alpha"] = lora_alpha(adapter)
    return a


def train_plan(cfg, build_model: bool = True) -> TrainPlan:
    path = resolve_model_path(cfg.model, cfg.output_root, cfg.offline, build=build_model)
    kind = "model" if cfg.adapter.type == "full" else "adapter"
    target = Path(cfg.output_dir).resolve() if cfg.output_dir else None
    key = train_key(cfg, path)
    if cfg.adapter.init_from and kind == "adapter":
        key["adapter"]["init_from"] = init_identity(cfg)
    return TrainPlan(path, kind, product_name(cfg), key, store(cfg), target)


def flix_total_rank(cfg) -> int:
    """sum over feature types of r_t x (values of t in the training data): FLix's rank directions."""
    a = cfg.adapter
    values = feature_values(load_mixture(cfg.data, is_offline(cfg.offline)), list(a.features))
    return sum(int(a.ranks[t]) * len(values[t]) for t in a.features)


def init_identity(cfg) -> dict:
    """What a continued LoRA starts from: an expert (by its product hash) or an adapter dir."""
    ref = cfg.adapter.init_from
    if ref in cfg.experts:
        return {"expert": ref, "hash": config_hash(train_plan(expert_config(cfg, ref), build_model=False).key)}
    m = read_manifest(ref) or {}
    return {"path": str(Path(ref).resolve()), "hash": m.get("hash")}


def init_dir(cfg) -> str:
    ref = cfg.adapter.init_from
    return str(expert_product(cfg, ref)) if ref in cfg.experts else ref


def expert_product(cfg, name: str) -> Path:
    """The trained product of expert `name` of the experiment `cfg`, or one line saying how to make it."""
    found = existing_product(train_plan(expert_config(cfg, name)))
    if found is None:
        raise MissingArtifactError(f"expert '{name}' is not trained yet; run: polyft train "
                                   f"+exp={cfg.exp_name or 'EXP'} expert={name}")
    return found


def existing_product(p: TrainPlan) -> Path | None:
    return p.store.find(p.kind, p.name, p.key, p.target)


def expert_config(cfg: DictConfig, name: str) -> DictConfig:
    """Expert `name`'s config, with a LoRA sized to a FLix expert resolved (reads its data)."""
    out = expert_cfg(cfg, name)
    if out.adapter.get("match"):
        out = resolve_match(out, cfg)
    return out


def resolve_match(cfg, root):
    """adapter.match=EXPERT (a LoRA expert beside a FLix expert of the experiment `root`): the
    config with adapter.r set to the rank whose LoRA has the FLix expert's trainable parameter
    count. FLix has one LoRA of rank r_t per value of each feature type on the same modules,
    so that rank is sum_t r_t * n_t (n_t: the values the FLix expert's data carries)."""
    if cfg.adapter.type != "lora" or not cfg.adapter.match:
        return cfg
    ref = cfg.adapter.match
    if ref not in root.experts:
        raise PolyftError(f"adapter.match={ref}: not an expert of this experiment")
    other = expert_cfg(root, ref)
    if other.adapter.type != "flix":
        raise PolyftError(f"adapter.match={ref}: expert {ref} is adapter={other.adapter.type}, not flix")
    if list(other.adapter.target_modules) != list(cfg.adapter.target_modules):
        raise PolyftError(f"adapter.match={ref}: adapter.target_modules differ from expert {ref}'s "
                          f"({list(other.adapter.target_modules)}); parameter counts would not match")
    fa = other.adapter
    values = feature_values(load_mixture(other.data, is_offline(other.offline)), list(fa.features))
    counts = {t: int(fa.ranks[t]) * len(values[t]) for t in fa.features}
    alpha = {t: fa.alpha[t] if OmegaConf.is_config(fa.alpha) else fa.alpha for t in fa.features}
    out = copy.deepcopy(cfg)
    out.adapter.r = sum(counts.values())
    # the scale alpha / r of FLix's rank directions (their mean, weighted by rank, when it differs per type)
    out.adapter.alpha = float(sum(counts[t] * alpha[t] / int(fa.ranks[t]) for t in fa.features))
    return out


# ---------------------------------------------------------------- refs

def check_refs(cfg) -> None:
    """An experiment's refs that no earlier stage produces must be existing paths."""
    if not (cfg.experts or cfg.baselines):
        return
    for key, ref in unproduced_refs(cfg):
        if not Path(ref).expanduser().exists():
            raise PolyftError(f"{key} names '{ref}', which is no path and no earlier stage of "
                              f"exp={cfg.exp_name} produces; known: {', '.join(['base', *cfg.experts, *merge_names(cfg)])}")


class Refs:
    """What adapter-space merge methods borrow from here, so that they sit below it: refs to
    directories, and a data option (or mapping) to its rows."""

    def __init__(self, cfg):
        self.cfg = cfg

    def path(self, ref) -> Path:
        return resolve_ref(self.cfg, ref)

    def data(self, node) -> tuple[list[dict], int] | None:
        """(rows, max_length) of a data option name or mapping; None for anything else (a file)."""
        if isinstance(node, str):
            f = option_file("data", node, self.cfg.config_dirs)
            if f is None:
                return None
            node = OmegaConf.load(f)
        if not isinstance(node, (dict, DictConfig)):
            return None
        if isinstance(node, DictConfig):  # interpolations (data.seed: ${seed}) resolve against the run's config
            node = OmegaConf.to_container(node, resolve=True)
        dc = OmegaConf.merge(OmegaConf.structured(DataConfig), node)
        check_data(dc)
        return load_mixture(dc, is_offline(self.cfg.offline)), dc.max_length


def resolve_ref(cfg, ref, build: bool = True) -> Path:
    """The directory a model reference names: `base` (the configured model), an expert or a
    merge of the experiment (its product in the store), or a path. Merges of merges resolve
    recursively; adapter-space methods get this function to resolve their own refs."""
    exp = cfg.exp_name or "EXP"
    if ref == "base":
        return Path(resolve_model_path(cfg.model, cfg.output_root, cfg.offline, build=build))
    if ref in cfg.experts:
        return expert_product(cfg, ref)
    if cfg.experts or cfg.baselines:
        if ref in merge_names(cfg):
            found = find_merged(merge_cfg(cfg, ref))
            if found is None:
                raise MissingArtifactError(f"merge '{ref}' is not made yet; run: polyft merge +exp={exp}")
            return found
    path = Path(os.path.expanduser(str(ref)))
    if path.exists():
        return path.resolve()
    if cfg.experts or cfg.baselines:
        known = ", ".join(["base", *cfg.experts, *merge_names(cfg)])
        raise PolyftError(f"{ref}: no such path, and not one of exp={exp}'s models ({known})")
    raise PolyftError(f"{ref}: no such model or adapter directory; use base or a path")


def find_merged(cfg) -> Path | None:
    """The store's product of the merge `cfg.merge`, if made (its inputs must exist)."""
    return store(cfg).find(MERGED, cfg.merge.name or cfg.merge.method, merge_key(cfg))


@dataclass
class MergeInputs:
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


def merge_inputs(cfg) -> MergeInputs:
    """The directories a model merge reads, after the presence rules of its method."""
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
    inputs = MergeInputs([_ref(cfg, k, r) for k, r in refs], [k for k, _ in refs])
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


def merge_key(cfg, inputs: MergeInputs | None = None) -> dict:
    """What determines a merge's product: for a model merge, the method's config keys and the
    inputs' identity; an adapter method says itself."""
    method = registry.get(cfg.merge.method)
    if method.product == "adapter":
        return method.product_key(cfg, Refs(cfg))
    inputs = inputs or merge_inputs(cfg)
    m = OmegaConf.to_container(cfg.merge, resolve=True)
    merge = {k: m[k] for k in ("method", "dtype", "shard_size", "vocab", *method.config_keys())}
    resolved = dict(inputs.all())
    for key in ("base", "config_source", "tokenizer_source"):
        merge[key] = str(resolved[f"merge.{key}"]) if f"merge.{key}" in resolved else None
    merge["models"] = [str(p) for p in inputs.models]
    paths = {str(p) for _, p in inputs.all()} | {str(p) for p in inputs.adapter_bases.values()}
    return {"merge": merge, "inputs": {p: fingerprint(Path(p)) for p in sorted(paths)}}


def eval_refs(cfg) -> list[str]:
    e = cfg.eval
    return [str(r) for r in e.models] if e.models is not None else [str(e.model)]
