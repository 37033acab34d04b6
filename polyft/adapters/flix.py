"""FLix: featurized low-rank mixtures (Lin, Wang et al., 2024, arXiv 2402.17934).

Every value of every feature (task=math, lang=sw) owns a LoRA (A_v [r_t, in], B_v [out, r_t])
on each target module, and an example with feature set F computes

    h = W0 x + sum over f in F of (alpha_t / r_t) B_f A_f x        (t: the type of f)

Per-example routing costs one LoRA matmul of the summed rank R = sum of all values' ranks:
every value's A is stacked into [R, in], x is projected once onto all of them, a per-example
gate [batch, R] (alpha_t / r_t on the rows of the values the example carries, 0 elsewhere)
masks the projection, and the stacked B [out, R] maps back. The zeros of the gate also zero
the gradients of the values an example does not carry, so it trains only its own features.
This is exactly the cost of a shared LoRA of rank R, the baseline with the same parameters.

The gate is set once per model call (a forward pre-hook reads `flix_features` from the
model's keyword arguments, or `routing()` sets it) and read by every FLix layer; feature
dropout is drawn there, so all layers of an example see the same dropped features.

Save format: a directory with flix_config.json (FlixConfig) and flix_model.safetensors
holding `<module>.lora_A.<type>.<i>` [r, in] and `<module>.lora_B.<type>.<i>` [out, r],
i the value's index in config.values[type]. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from polyft.adapters.lora import write_lora
from polyft.errors import PolyftError
from polyft.runs import resolve_base

FEATURE_TYPES = ("task", "lang")  # the fields every training row carries (polyft.data.sources)
CONFIG_FILE = "flix_config.json"
WEIGHTS_FILE = "flix_model.safetensors"
ABSENT = -1  # feature id of a value the adapter has no LoRA for (or no value at all)


@dataclass
class FlixConfig:
    values: dict  # feature type -> its values in index order, e.g. {"task": ["math"], "lang": ["de", "en"]}
    ranks: dict  # feature type -> rank
    alpha: dict  # feature type -> alpha; the scale of a value's LoRA is alpha / rank
    features: list = field(default_factory=lambda: list(FEATURE_TYPES))
    feature_dropout: float = 0.1
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    modules: list = field(default_factory=list)  # adapted module paths, filled by inject()
    format: str = "polyft-flix/1"

    def slots(self) -> list[tuple[str, int]]:
        """(type, value index) of every LoRA in stacking order."""
        return [(t, i) for t in self.features for i in range(len(self.values[t]))]

    def scale(self, ftype: str) -> float:
        return float(self.alpha[ftype]) / int(self.ranks[ftype])

    def total_rank(self, feature_set: dict | None = None) -> int:
        """Summed rank of all values (the shared-LoRA rank with the same parameter count), or
        of one feature set {type: value}."""
        if feature_set is None:
            return sum(int(self.ranks[t]) * len(self.values[t]) for t in self.features)
        return sum(int(self.ranks[t]) for t in feature_set)

    def index(self, ftype: str, value) -> int:
        vals = self.values[ftype]
        return vals.index(value) if value in vals else ABSENT

    def save(self, directory: Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory, key: str = "adapter") -> "FlixConfig":
        f = Path(directory) / CONFIG_FILE
        if not f.is_file():
            raise PolyftError(f"{key}={directory}: not a FLix adapter directory (no {CONFIG_FILE})")
        try:
            cfg = cls(**json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError):
            raise PolyftError(f"{key}={directory}: {CONFIG_FILE} is not a FLix config") from None
        cfg.base_model_name_or_path = resolve_base(directory, cfg.base_model_name_or_path)
        return cfg


def feature_values(rows: list[dict], features: list[str]) -> dict:
    """The values each feature type takes in the training rows, sorted (the index order)."""
    return {t: sorted({str(r[t]) for r in rows if r.get(t)}) for t in features}


# ---------------------------------------------------------------- the layer

class Router:
    """The gate of the current batch, shared by every FLix layer of a model."""

    def __init__(self):
        self.gate = None  # [batch, R] float, or None before the first routed call


def _layer_class():
    import torch
    from torch import nn

    class FlixLinear(nn.Module):
        """A linear (plain or bitsandbytes-quantised) plus one LoRA per feature value."""

        def __init__(self, base_layer, cfg: FlixConfig, router: Router):
            super().__init__()
            self.base_layer = base_layer
            self.router = router
            self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
            in_f, out_f = base_layer.in_features, base_layer.out_features
            weight = base_layer.weight
            device = weight.device
            # full precision LoRA factors, whatever the base stores (4/8-bit, bf16)
            self.lora_A = nn.ParameterDict()
            self.lora_B = nn.ParameterDict()
            for ftype in cfg.features:
                r = int(cfg.ranks[ftype])
                for i in range(len(cfg.values[ftype])):
                    a = torch.empty(r, in_f, device=device, dtype=torch.float32)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft initialises lora_A
                    self.lora_A[f"{ftype}_{i}"] = nn.Parameter(a)
                    self.lora_B[f"{ftype}_{i}"] = nn.Parameter(torch.zeros(out_f, r, device=device))

        def stacked(self):
            """A [R, in] and B [out, R] of all values, in slot order."""
            return torch.cat(list(self.lora_A.values())), torch.cat(list(self.lora_B.values()), dim=1)

        def forward(self, x, *args, **kwargs):
            out = self.base_layer(x, *args, **kwargs)
            gate = self.router.gate
            if gate is None:
                raise RuntimeError("a FLix model was called without features: pass flix_features=[batch, "
                                   "n_types] ids to the model or use polyft.adapters.flix.routing()")
            a, b = self.stacked()
            h = self.drop(x).to(a.dtype) @ a.T
            h = h * gate.view(gate.shape[0], *([1] * (h.dim() - 2)), gate.shape[1]).to(h.dtype)
            return out + (h @ b.T).to(out.dtype)

    return FlixLinear


def _targets(model, target_modules: list[str]) -> list[str]:
    from torch import nn

    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "lm_head" in name:
            continue
        linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if linear and (leaf in target_modules or target_modules == ["all-linear"]):
            names.append(name)
    return names


def inject(model, cfg: FlixConfig):
    """Replace the target modules of `model` (in place) by FLix layers; freeze the rest.
    Adds the routing pre-hook. Returns the model (with .flix_config and .flix_router)."""
    import torch

    FlixLinear = _layer_class()
    names = _targets(model, list(cfg.target_modules))
    if not names:
        raise PolyftError(f"adapter.target_modules={list(cfg.target_modules)}: no linear module of the model matches")
    cfg.modules = names
    for p in model.parameters():
        p.requires_grad_(False)
    router = Router()
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, FlixLinear(getattr(parent, leaf), cfg, router))
    model.flix_config, model.flix_router = cfg, router

    def pre_hook(module, args, kwargs):
        feats = kwargs.pop("flix_features", None)
        if feats is not None:
            set_features(module, torch.as_tensor(feats))
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return model


def flix_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "router")}


# ---------------------------------------------------------------- routing and feature dropout

def drop_features(ids, p: float, generator=None):
    """Each present feature of each example dropped with probability p; an example that would
    lose all its features keeps one of them, chosen uniformly."""
    import torch

    present = ids != ABSENT
    if p <= 0:
        return ids
    drop = (torch.rand(ids.shape, generator=generator) < p) & present
    lost_all = present.any(1) & ~(present & ~drop).any(1)
    if lost_all.any():
        scores = torch.rand(ids.shape, generator=generator).masked_fill(~present, -1.0)
        keep = torch.zeros_like(drop)
        keep[torch.arange(ids.shape[0]), scores.argmax(1)] = True
        drop = drop & ~(keep & lost_all[:, None])
    return ids.masked_fill(drop, ABSENT)


def gate_for(cfg: FlixConfig, ids):
    """[batch, R]: alpha_t / r_t on the rows of each example's values, 0 elsewhere."""
    import torch

    cols = []
    for k, ftype in enumerate(cfg.features):
        r, scale = int(cfg.ranks[ftype]), cfg.scale(ftype)
        onehot = torch.zeros(ids.shape[0], len(cfg.values[ftype]))
        have = ids[:, k] != ABSENT
        onehot[have, ids[have, k]] = scale
        cols.append(onehot.repeat_interleave(r, dim=1))
    return torch.cat(cols, dim=1)


def set_features(model, ids) -> None:
    """Route the next calls of `model`: ids [batch, n_types] (ABSENT for no value). In training
    mode feature dropout is drawn here, once per call for every layer."""
    cfg = model.flix_config
    ids = ids.long().cpu()
    if model.training and cfg.feature_dropout > 0:
        ids = drop_features(ids, cfg.feature_dropout)
    device = next(iter(flix_layers(model).values())).lora_A[f"{cfg.features[0]}_0"].device
    model.flix_router.gate = gate_for(cfg, ids).to(device)


def encode(cfg: FlixConfig, feature_sets: list[dict]):
    """ids [batch, n_types] of feature sets {type: value}; unknown values are ABSENT."""
    import torch

    return torch.tensor([[cfg.index(t, fs.get(t)) for t in cfg.features] for fs in feature_sets],
                        dtype=torch.long)


@contextmanager
def routing(model, feature_sets: list[dict]):
    """Calls inside the block route example i through feature_sets[i]."""
    set_features(model, encode(model.flix_config, feature_sets))
    try:
        yield model
    finally:
        model.flix_router.gate = None


class FeatureCollator:
    """Wraps a collator: the feature columns of each example become `flix_features` ids."""

    def __init__(self, inner, cfg: FlixConfig):
        self.inner, self.cfg = inner, cfg

    def __call__(self, examples):
        ids = encode(self.cfg, [{t: ex.get(t) for t in self.cfg.features} for ex in examples])
        batch = self.inner([{k: v for k, v in ex.items() if k not in FEATURE_TYPES} for ex in examples])
        batch["flix_features"] = ids
        return batch


# ---------------------------------------------------------------- save / load

def state_tensors(model, state_dict: dict | None = None) -> dict:
    """flix_model.safetensors names -> tensors (the LoRAs only), read from the model or from
    its gathered `state_dict` (a model sharded over processes holds only its shards)."""
    cfg = model.flix_config
    out = {}
    for name, layer in flix_layers(model).items():
        for key, a in layer.lora_A.items():
            ftype, i = key.rsplit("_", 1)
            b = layer.lora_B[key]
            if state_dict is not None:
                a, b = state_dict[f"{name}.lora_A.{key}"], state_dict[f"{name}.lora_B.{key}"]
            out[f"{name}.lora_A.{ftype}.{i}"] = a.detach().float().cpu()
            out[f"{name}.lora_B.{ftype}.{i}"] = b.detach().float().cpu()
    assert set(cfg.modules) == set(flix_layers(model)), "FLix layers changed since inject()"
    return out


def save(model, directory, state_dict: dict | None = None) -> None:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.flix_config.save(d)
    save_file({k: v.contiguous() for k, v in state_tensors(model, state_dict).items()}, str(d / WEIGHTS_FILE),
              metadata={"format": "pt"})


def read(directory, key: str = "adapter") -> tuple[FlixConfig, dict]:
    """A FLix directory's config and tensors, or one line naming `key`."""
    from safetensors.torch import load_file

    cfg = FlixConfig.load(directory, key)
    f = Path(directory) / WEIGHTS_FILE
    if not f.is_file():
        raise PolyftError(f"{key}={directory}: no {WEIGHTS_FILE} (safetensors weights) in the FLix directory")
    return cfg, load_file(str(f))


def load_weights(model, cfg_saved: FlixConfig, tensors: dict) -> int:
    """Copy saved LoRAs into `model`'s FLix layers, matched by (module, type, value), so a
    continued run whose data adds values keeps the trained ones. Returns how many were copied."""
    import torch

    cfg = model.flix_config
    copied = 0
    with torch.no_grad():
        for name, layer in flix_layers(model).items():
            for ftype in cfg.features:
                for i, value in enumerate(cfg.values[ftype]):
                    j = cfg_saved.index(ftype, value) if ftype in cfg_saved.values else ABSENT
                    a_key = f"{name}.lora_A.{ftype}.{j}"
                    if j == ABSENT or a_key not in tensors:
                        continue
                    if tensors[a_key].shape != layer.lora_A[f"{ftype}_{i}"].shape:
                        raise PolyftError(f"adapter.init_from: {ftype} rank {tensors[a_key].shape[0]} differs "
                                          f"from adapter.ranks.{ftype}={cfg.ranks[ftype]}")
                    layer.lora_A[f"{ftype}_{i}"].copy_(tensors[a_key])
                    layer.lora_B[f"{ftype}_{i}"].copy_(tensors[a_key.replace(".lora_A.", ".lora_B.")])
                    copied += 1
    return copied


def load(model, directory):
    """`model` (a base) with the FLix adapter at `directory` injected and loaded."""
    saved, tensors = read(directory)
    cfg = FlixConfig(**{**asdict(saved), "modules": []})
    inject(model, cfg)
    load_weights(model, saved, tensors)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- composition (maths only)

def compose_factors(cfg: FlixConfig, tensors: dict, feature_set: dict) -> dict[str, tuple]:
    """module -> (A [R_F, in], B [out, R_F]) of one LoRA equal to the FLix sum over the feature
    set {type: value} (every value known): A's stacked, B's concatenated, alpha_t / r_t folded
    into B, so it is applied with scale 1."""
    import torch

    out = {}
    for module in cfg.modules:
        a_parts, b_parts = [], []
        for ftype in cfg.features:
            if ftype not in feature_set:
                continue
            i = cfg.index(ftype, feature_set[ftype])
            a_parts.append(tensors[f"{module}.lora_A.{ftype}.{i}"])
            b_parts.append(tensors[f"{module}.lora_B.{ftype}.{i}"] * cfg.scale(ftype))
        out[module] = (torch.cat(a_parts), torch.cat(b_parts, dim=1))
    return out


def resolve_feature_set(cfg: FlixConfig, wanted: dict, key: str = "merge.features") -> tuple[dict, list[str]]:
    """The feature set to compose for `wanted` {type: value}: unknown types and tasks are errors,
    an unseen non-task value (a new language) is left out with a notice."""
    notices, out = [], {}
    for ftype, value in wanted.items():
        if ftype not in cfg.features:
            raise PolyftError(f"{key}.{ftype}: not a feature of this adapter; its features: {', '.join(cfg.features)}")
        if value is None or value == "":
            continue
        if str(value) in cfg.values[ftype]:
            out[ftype] = str(value)
        elif ftype == "task":
            raise PolyftError(f"{key}.task={value}: this task was never trained; trained tasks: "
                              f"{', '.join(cfg.values['task'])}")
        else:
            notices.append(f"{ftype}={value} was not seen in training; composing without it "
                           f"(trained {ftype} values: {', '.join(cfg.values[ftype])})")
    if not out:
        raise PolyftError(f"{key}: no trained feature value to compose; known: "
                          + "; ".join(f"{t}: {', '.join(v)}" for t, v in cfg.values.items()))
    return out, notices


def peft_config(cfg: FlixConfig, rank: int, base: str | None) -> dict:
    """A standard peft LoRA config of rank `rank` applied with scale 1 (lora_alpha = r)."""
    from peft import LoraConfig

    targets = sorted({m.rsplit(".", 1)[-1] for m in cfg.modules})
    conf = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM", base_model_name_or_path=base).to_dict()
    return json.loads(json.dumps(conf, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def compose_to_peft(directory, feature_set: dict, out_dir, base: str | None = None, key: str = "merge.adapter"):
    """Write the PEFT LoRA of one (resolved) feature set of the FLix adapter at `directory`."""
    cfg, tensors = read(directory, key)
    factors = compose_factors(cfg, tensors, feature_set)
    rank = cfg.total_rank(feature_set)
    peft_tensors = {}
    for module, (a, b) in factors.items():
        peft_tensors[f"base_model.model.{module}.lora_A.weight"] = a
        peft_tensors[f"base_model.model.{module}.lora_B.weight"] = b
    write_lora(out_dir, peft_config(cfg, rank, base or cfg.base_model_name_or_path), peft_tensors)
    return rank
