"""What an experiment names: its experts (trained models), its merges, and refs to them.

An experiment (`conf/exp/NAME.yaml`, `# @package _global_`) overrides groups and adds:
    experts:   {math: {data: ..., adapter: ..., train: ...}, lang: {...}}
    merge:     the experiment's main merge (the one a sweep varies), named by merge.name
    baselines: {soup: {method: linear, models: [math, lang]}, ...}
A ref in merge.models / eval.models is `base`, an expert name, a merge name or a path;
polyft.commands.merge.resolve_ref turns it into a directory (this module reads no products).

Layers: config (schemas, group rules) < experiment (structure) < train < merge < eval < run < cli.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from polyft.errors import PolyftError

GROUPS = ("model", "adapter", "quant", "data", "train")


def _group_node(cfg: DictConfig, group: str, value):
    """An expert may name a group option (`data: demo_math`) or give it inline."""
    if isinstance(value, str):
        from polyft.config.schema import option_file, option_names

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
    if out.adapter.get("match") and not cfg.get("expert"):  # a LoRA sized to a FLix expert
        out = resolve_match(out, cfg)
    return out


def resolve_match(cfg, root):
    """adapter.match=EXPERT (a LoRA expert beside a FLix expert of the experiment `root`): the
    config with adapter.r set to the rank whose LoRA has the FLix expert's trainable parameter
    count. FLix has one LoRA of rank r_t per value of each feature type on the same modules,
    so that rank is sum_t r_t * n_t (n_t: the values the FLix expert's data carries)."""
    if cfg.adapter.type != "lora" or not cfg.adapter.match:
        return cfg

    from polyft.adapters.flix import feature_values
    from polyft.data.mixture import load_mixture
    from polyft.models.load import is_offline

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
    from polyft.config.schema import MergeConfig

    out.merge = OmegaConf.merge(OmegaConf.structured(MergeConfig), cfg.baselines[name], {"name": name})
    return out


def eval_models(cfg: DictConfig) -> list[str]:
    """What `polyft run` evaluates: eval.models, or base, every expert and every merge."""
    if cfg.eval.models:
        return list(cfg.eval.models)
    return ["base", *cfg.experts, *merge_names(cfg)]


def _check_swap_depth(cfg: DictConfig, m, where: str) -> None:
    """A layer swap of two experts fits their depth, known before they are trained (from the
    tiny spec, the preset's num_layers or a local config.json): a sweep point that cannot be
    merged is refused before the experts train, not after."""
    from polyft.config.schema import model_layer_count

    if m.method != "layer_swap" or m.middle not in cfg.experts:
        return
    n = model_layer_count(expert_cfg(cfg, m.middle).model)
    used = m.bottom + m.top + m.transition_bottom + m.transition_top
    if n is not None and used > n:
        raise PolyftError(f"{where}.bottom + top + transition_bottom + transition_top = {used} layers, "
                          f"but {cfg.model.name} has {n}; the four zones must fit in {n} layers")


def validate_experiment(cfg: DictConfig) -> None:
    """Structure only (no files): experts compose and validate, refs name something produced."""
    from polyft.config.schema import validate

    produced = {"base"}
    for name in cfg.experts:
        ecfg = expert_cfg(cfg, name)
        with open_dict(ecfg):
            ecfg.command = "train"
            ecfg.experts, ecfg.baselines, ecfg.expert = {}, {}, None
        validate(ecfg)
        init = ecfg.adapter.init_from
        if init and init not in produced and not Path(init).exists():
            raise PolyftError(f"experts.{name}.adapter.init_from={init}: not an earlier expert nor a directory")
        produced.add(name)
    if cfg.expert and cfg.expert not in cfg.experts:
        raise PolyftError(f"expert={cfg.expert}: not defined by exp={cfg.exp_name}; "
                          f"its experts: {', '.join(cfg.experts) or '(none)'}")
    if cfg.command not in ("merge", "eval", "run"):
        return
    for name in merge_names(cfg):
        m = merge_cfg(cfg, name).merge
        where = "merge" if name == main_merge_name(cfg) and name not in cfg.baselines else f"baselines.{name}"
        for ref in [*m.models, *m.adapters, m.base, m.middle, m.outer]:
            if ref is not None and str(ref) not in produced and not Path(str(ref)).exists():
                raise PolyftError(f"{where} names model '{ref}', which no stage of exp={cfg.exp_name} "
                                  f"produces; known: {', '.join(sorted(produced))}")
        _check_swap_depth(cfg, m, where)
        produced.add(name)
    if cfg.command in ("eval", "run") and cfg.experts:
        for ref in eval_models(cfg):
            if ref not in produced and not Path(ref).exists():
                raise PolyftError(f"eval.models names '{ref}', which no stage of exp={cfg.exp_name} "
                                  f"produces; known: {', '.join(sorted(produced))}")


def validate_run(cfg: DictConfig) -> None:
    """validate() of the groups, then, for an experiment, of its structure: what a command
    checks before it reads any file."""
    from polyft.config.schema import validate

    validate(cfg)
    if cfg.experts or cfg.baselines:
        validate_experiment(cfg)
