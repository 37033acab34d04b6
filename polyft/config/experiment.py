"""What an experiment names: its experts (trained models), its merges, and refs to them.

An experiment (`conf/exp/NAME.yaml`, `# @package _global_`) overrides groups and adds:
    experts:   {math: {data: ..., adapter: ..., train: ...}, lang: {...}}
    merge:     the experiment's main merge (the one a sweep varies), named by merge.name
    baselines: {soup: {method: linear, models: [math, lang]}, ...}
A ref in merge.models / eval.models is `base`, an expert name, a merge name or a path;
polyft.products.resolve_ref turns it into a directory. This module reads no products and
no data: an expert's named group options (`data: demo_math`) are config files, read here.
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict

from polyft.config.schema import MergeConfig, option_file, option_names
from polyft.errors import PolyftError

GROUPS = ("model", "adapter", "quant", "data", "train")


def _group_node(cfg: DictConfig, group: str, value):
    """An expert may name a group option (`data: demo_math`) or give it inline."""
    if isinstance(value, str):
        f = option_file(group, value, cfg.config_dirs)
        if f is None:
            raise PolyftError(f"{group}={value}: no such option; available: "
                              f"{', '.join(option_names(group, cfg.config_dirs))}")
        return OmegaConf.load(f)
    return value


def expert_cfg(cfg: DictConfig, name: str) -> DictConfig:
    """The root config with expert `name`'s overrides applied (typed: bad keys fail here)."""
    if name not in cfg.experts:
        raise PolyftError(f"expert={name}: not defined by exp={cfg.exp_name}; "
                          f"its experts: {', '.join(cfg.experts) or '(none)'}")
    spec = cfg.experts[name]
    out = copy.deepcopy(cfg)
    # Always on top of the root's groups: an expert's config (cont, with init_from) that
    # derives another expert's (the one it starts from) must not pass its overrides on.
    with open_dict(out):
        out.expert = name
        if cfg.expert_root is None:  # cfg is the root: its groups, kept for derived experts
            out.expert_root = {g: out[g] for g in GROUPS}
        else:
            for g in GROUPS:
                out[g] = cfg.expert_root[g]
    for key, value in spec.items():
        if key not in GROUPS:
            raise PolyftError(f"experts.{name}.{key}: not a trainable group; allowed: {', '.join(GROUPS)}")
        node = _group_node(cfg, key, value)
        if isinstance(value, str):  # a whole option replaces the group
            out[key] = OmegaConf.merge(OmegaConf.structured(type(OmegaConf.to_object(cfg[key]))), node)
        else:
            out[key] = OmegaConf.merge(out[key], node)
    return out


def merge_names(cfg: DictConfig) -> list[str]:
    names = list(cfg.baselines)
    if cfg.merge.models or cfg.merge.middle or cfg.merge.adapters:
        names.insert(0, main_merge_name(cfg))
    return names


def main_merge_name(cfg: DictConfig) -> str:
    return cfg.merge.name or cfg.merge.method


def merge_cfg(cfg: DictConfig, name: str) -> DictConfig:
    """The root config whose `merge` group is merge `name` (the main one or a baseline)."""
    if name == main_merge_name(cfg) and name not in cfg.baselines:
        return cfg
    out = copy.deepcopy(cfg)
    out.merge = OmegaConf.merge(OmegaConf.structured(MergeConfig), cfg.baselines[name], {"name": name})
    return out


def eval_models(cfg: DictConfig) -> list[str]:
    """What `polyft run` evaluates: eval.models, or base, every expert and every merge."""
    if cfg.eval.models:
        return list(cfg.eval.models)
    return ["base", *cfg.experts, *merge_names(cfg)]


def layer_count(model_cfg) -> int | None:
    """The depth known without reading files: the tiny spec's, or a hub preset's num_layers."""
    if model_cfg.tiny is not None and not model_cfg.path:
        return model_cfg.tiny.num_layers
    return model_cfg.num_layers


def _check_swap_depth(cfg: DictConfig, m, where: str, depth=layer_count) -> None:
    """A layer swap of two experts fits their depth, when it is known from the config (or,
    from a command's preflight, `depth` reads the model's config.json): a sweep point that
    cannot be merged is refused before the experts train, not after (the merge's preflight
    checks the trained models' headers too)."""
    if m.method != "layer_swap" or m.middle not in cfg.experts:
        return
    n = depth(expert_cfg(cfg, m.middle).model)
    used = m.bottom + m.top + m.transition_bottom + m.transition_top
    if n is not None and used > n:
        raise PolyftError(f"{where}.bottom + top + transition_bottom + transition_top = {used} layers, "
                          f"but {cfg.model.name} has {n}; the four zones must fit in {n} layers")


def unproduced_refs(cfg: DictConfig) -> list[tuple[str, str]]:
    """(config key, ref) of every ref that no earlier stage of the experiment produces, in
    stage order: each must be a path, which the command's preflight checks (no files here)."""
    made, out = {"base"}, []
    for name in cfg.experts:
        init = expert_cfg(cfg, name).adapter.init_from
        if init and init not in made:
            out.append((f"experts.{name}.adapter.init_from", str(init)))
        made.add(name)
    if cfg.command in ("merge", "eval", "run"):
        for name in merge_names(cfg):
            m = merge_cfg(cfg, name).merge
            where = "merge" if name == main_merge_name(cfg) and name not in cfg.baselines else f"baselines.{name}"
            out += [(where, str(r)) for r in [*m.models, *m.adapters, m.base, m.middle, m.outer]
                    if r is not None and str(r) not in made]
            made.add(name)
    if cfg.command in ("eval", "run") and cfg.experts:
        out += [("eval.models", r) for r in eval_models(cfg) if r not in made]
    return out


def check_swap_depths(cfg: DictConfig, depth=layer_count) -> None:
    """Every layer-swap merge of the experiment against its middle expert's depth."""
    for name in merge_names(cfg):
        where = "merge" if name == main_merge_name(cfg) and name not in cfg.baselines else f"baselines.{name}"
        _check_swap_depth(cfg, merge_cfg(cfg, name).merge, where, depth)


def validate_structure(cfg: DictConfig, validate_groups) -> None:
    """Structure only (no files): each expert composes and passes `validate_groups`, the
    expert a run selects exists, merges fit the experts' depth."""
    for name in cfg.experts:
        ecfg = expert_cfg(cfg, name)
        with open_dict(ecfg):
            ecfg.command = "train"
            ecfg.experts, ecfg.baselines, ecfg.expert = {}, {}, None
        validate_groups(ecfg)
    if cfg.expert and cfg.expert not in cfg.experts:
        raise PolyftError(f"expert={cfg.expert}: not defined by exp={cfg.exp_name}; "
                          f"its experts: {', '.join(cfg.experts) or '(none)'}")
    if cfg.command in ("merge", "eval", "run"):
        check_swap_depths(cfg)
