"""What an experiment names: its experts (trained models), its merges, and refs to them.

An experiment (`conf/exp/NAME.yaml`, `# @package _global_`) overrides groups and adds:
    experts:   {math: {data: ..., adapter: ..., train: ...}, lang: {...}}
    merge:     the experiment's main merge (the one a sweep varies), named by merge.name
    baselines: {soup: {method: linear, models: [math, lang]}, ...}
A ref in merge.models / eval.models is `base`, an expert name, a merge name or a path.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from polyft.errors import MissingArtifactError, PolyftError

GROUPS = ("model", "adapter", "quant", "data", "train")


def _group_node(group: str, value):
    """An expert may name a group option (`data: demo_math`) or give it inline."""
    if isinstance(value, str):
        f = Path(__file__).resolve().parent / "conf" / group / f"{value}.yaml"
        if not f.is_file():
            options = sorted(p.stem for p in f.parent.glob("*.yaml"))
            raise PolyftError(f"{group}={value}: no such option; available: {', '.join(options)}")
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
        node = _group_node(key, value)
        if isinstance(value, str):  # a whole option replaces the group
            out[key] = OmegaConf.merge(OmegaConf.structured(type(OmegaConf.to_object(cfg[key]))), node)
        else:
            out[key] = OmegaConf.merge(out[key], node)
    if out.adapter.get("match") and not cfg.get("expert"):  # a LoRA sized to a FLix expert
        from polyft.train import resolve_match

        out = resolve_match(out, cfg)
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
    from polyft.config import MergeConfig

    out.merge = OmegaConf.merge(OmegaConf.structured(MergeConfig), cfg.baselines[name], {"name": name})
    return out


def find_merged(cfg: DictConfig) -> Path | None:
    """The store's product of the merge `cfg.merge`, if made (its inputs must exist)."""
    from polyft.merge import adapter_space
    from polyft.merge.command import KIND, product_key, resolve_inputs
    from polyft.runs import ArtifactStore

    if adapter_space.is_adapter_method(cfg.merge.method):
        key = adapter_space.method_module(cfg.merge.method).product_key(cfg)
    else:
        key = product_key(cfg, resolve_inputs(cfg))
    return ArtifactStore(Path(cfg.output_root) / "artifacts").find(KIND, main_merge_name(cfg), key)


def resolve_ref(cfg: DictConfig, ref: str) -> Path:
    """A directory for `base`, an expert, a merge of the experiment, or a path."""
    if ref == "base":
        from polyft.models.load import resolve_model_path

        return Path(resolve_model_path(cfg.model, cfg.output_root, cfg.offline))
    exp = cfg.exp_name or "EXP"
    if ref in cfg.experts:
        from polyft.train import existing_product, plan

        found = existing_product(plan(expert_cfg(cfg, ref)))
        if found is None:
            raise MissingArtifactError(f"expert '{ref}' is not trained yet; run: polyft train +exp={exp} expert={ref}")
        return found
    if ref in cfg.baselines or (ref == main_merge_name(cfg) and (cfg.merge.models or cfg.merge.middle
                                                                  or cfg.merge.adapters)):
        found = find_merged(merge_cfg(cfg, ref))
        if found is None:
            raise MissingArtifactError(f"merge '{ref}' is not made yet; run: polyft merge +exp={exp}")
        return found
    path = Path(ref).expanduser()
    if path.exists():
        return path.resolve()
    known = ["base", *cfg.experts, *merge_names(cfg)]
    raise PolyftError(f"model ref '{ref}': no such path, and not one of this experiment's models "
                      f"({', '.join(known)})")


def eval_models(cfg: DictConfig) -> list[str]:
    """What `polyft run` evaluates: eval.models, or base, every expert and every merge."""
    if cfg.eval.models:
        return list(cfg.eval.models)
    return ["base", *cfg.experts, *merge_names(cfg)]


def _check_swap_depth(cfg: DictConfig, m, where: str) -> None:
    """A layer swap of two experts fits their depth, known before they are trained (from the
    tiny spec, the preset's num_layers or a local config.json): a sweep point that cannot be
    merged is refused before the experts train, not after."""
    from polyft.config import model_layer_count

    if m.method != "layer_swap" or m.middle not in cfg.experts:
        return
    n = model_layer_count(expert_cfg(cfg, m.middle).model)
    used = m.bottom + m.top + m.transition_bottom + m.transition_top
    if n is not None and used > n:
        raise PolyftError(f"{where}.bottom + top + transition_bottom + transition_top = {used} layers, "
                          f"but {cfg.model.name} has {n}; the four zones must fit in {n} layers")


def validate_experiment(cfg: DictConfig) -> None:
    """Structure only (no files): experts compose and validate, refs name something produced."""
    from polyft.config import validate

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
