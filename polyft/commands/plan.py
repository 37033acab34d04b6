"""`polyft plan`: what each run (each sweep point) trains and the memory it needs.

Nothing is loaded: the architecture comes from a local config.json (model=hf with a hub id:
the cached or fetched config.json), else the model preset's keys (hidden_size, num_layers, ...), else the tiny model's spec, and the memory is
arithmetic on it. Per point and per trained model it prints trainable and total parameters,
the quantisation, the estimated peak accelerator memory broken down (weights at their bits,
adapter, gradients, optimizer state, activations for batch x length with and without
activation checkpointing) and the smallest GPU of `plan.gpus` it fits.

The activation model counts the tensors autograd keeps per token and layer in a Llama-style
decoder (SDPA attention, SwiGLU MLP): full fine-tuning keeps 9h + 4i values (norm inputs and
outputs, q/k/v, the attention output and o_proj's input, the MLP's gate, activation, up and
down_proj's input); LoRA, whose frozen linears keep no inputs, 7h + 3i. Checkpointing keeps
one h per layer plus one layer recomputed. The loss keeps about 12 (fp32) or 14 (bf16)
bytes per vocabulary entry and token (logits, the fp32 copy, log-softmax, its gradient).
Peak = weights + adapter + optimizer + max(activations + loss, gradients) + overhead
(1 GiB of CUDA context and workspace on a GPU). tests/test_plan.py checks it against the
measured peak of real CPU training steps.

`plan.fit=true` under the SLURM launcher: polyft.cli.launchers calls `fit_resources` for every
point and submits it with the mem_gb (and gres) it returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from polyft.errors import ConfigError
from polyft.models.load import model_config_json, resolve_model_path
from polyft.products import expert_config, flix_total_rank

GIB = 2 ** 30
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_OVERHEAD = 1 * GIB
# Optimizer state bytes per trainable parameter, as a multiple of the parameter's bytes
# (None: fixed bytes per parameter).
OPTIMIZER_STATE = {"adamw_torch": (2, None), "adamw_torch_fused": (2, None), "adamw_hf": (2, None),
                   "adafactor": (0, 0.1), "sgd": (0, None), "adamw_bnb_8bit": (0, 2), "adamw_8bit": (0, 2),
                   "paged_adamw_8bit": (0, 2), "paged_adamw_32bit": (0, 8), "lion_8bit": (0, 1)}
@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> tuple[int, int]:
        """(parameters in the layers' linears, all the others: embeddings, head, norms)."""
        linear = self.layers * sum(a * b for a, b in self.shapes().values())
        other = self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden
        return linear, other


def architecture(model_cfg, output_root: str) -> Arch:
    """From a local config.json (the model's own), else the preset's keys, else the tiny spec."""
    conf = {}
    path = resolve_model_path(model_cfg, output_root, build=False) if model_cfg.tiny is not None \
        else model_cfg.path
    if path and (Path(path).expanduser() / "config.json").is_file():
        conf = json.loads((Path(path).expanduser() / "config.json").read_text())
        conf = conf.get("text_config", conf)
    elif model_cfg.path and not model_cfg.hidden_size:  # model=hf with a hub id: its config.json
        conf = model_config_json(model_cfg, output_root) or {}
    t = model_cfg.tiny
    pick = lambda key, preset, tiny: conf.get(key) or model_cfg.get(preset) or (t.get(tiny) if t else None)  # noqa: E731
    values = dict(hidden=pick("hidden_size", "hidden_size", "hidden_size"),
                  intermediate=pick("intermediate_size", "intermediate_size", "intermediate_size"),
                  layers=pick("num_hidden_layers", "num_layers", "num_layers"),
                  heads=pick("num_attention_heads", "num_heads", "num_heads"),
                  kv_heads=pick("num_key_value_heads", "num_kv_heads", "num_kv_heads")
                  or pick("num_attention_heads", "num_heads", "num_heads"),
                  vocab=pick("vocab_size", "vocab_size", "vocab_size"))
    keys = dict(hidden="hidden_size", intermediate="intermediate_size", layers="num_layers",
                heads="num_heads", kv_heads="num_kv_heads", vocab="vocab_size")
    missing = [f"model.{keys[k]}" for k, v in values.items() if not v]
    if missing:
        raise ConfigError(f"model={model_cfg.name}: its architecture is unknown ({', '.join(missing)} "
                          "missing); point model.path at a directory with config.json, or set them")
    tied = conf.get("tie_word_embeddings", model_cfg.tie_embeddings if t is None else False)
    return Arch(tied=bool(tied), **{k: int(v) for k, v in values.items()})


@dataclass
class Estimate:
    """One trained model of one point. Sizes in bytes."""
    name: str
    total_params: int
    trainable_params: int
    bits: int
    weights: float
    adapter: float
    gradients: float
    optimizer: float
    activations: float  # without checkpointing, loss included
    activations_ckpt: float  # with activation checkpointing, loss included
    overhead: float
    checkpointing: bool
    batch: int
    seq: int

    @property
    def peak(self) -> float:
        acts = self.activations_ckpt if self.checkpointing else self.activations
        return self.weights + self.adapter + self.optimizer + max(acts, self.gradients) + self.overhead

    def fits(self, gpus) -> int | None:
        """The smallest GPU size (GB, as sold: 10^9 bytes) that holds the peak."""
        return next((g for g in sorted(gpus) if self.peak <= g * 1e9), None)


def _bytes(dtype: str, device: str) -> int:
    if dtype in ("float32", "fp32") or (dtype == "auto" and device == "cpu"):
        return 4
    return 2


def estimate(cfg, name: str = "") -> Estimate:
    """The memory of training `cfg` (a composed run config) on one device."""
    arch = architecture(cfg.model, cfg.output_root)
    device = cfg.plan.device
    a = _bytes(cfg.model.dtype, device)  # weights and activations in the compute dtype
    batch = cfg.plan.batch_size or cfg.train.batch_size
    seq = cfg.plan.seq_len or cfg.data.max_length
    tokens = batch * seq
    linear, other = arch.params()
    total = linear + other
    bits = cfg.quant.bits or a * 8
    if cfg.quant.bits == 4:  # NF4/FP4 blocks of 64 with an absmax each: 8-bit (double quant) or fp32
        weights = linear * (4 + (8 / 64 + 32 / (64 * 256) if cfg.quant.double_quant else 32 / 64)) / 8
    elif cfg.quant.bits == 8:
        weights = linear * 1.0 + arch.layers * sum(o for _, o in arch.shapes().values()) * 4  # + row scales
    else:
        weights = linear * a
    weights += other * a
    h, i = arch.hidden, arch.intermediate
    if cfg.adapter.type == "full":
        trainable, adapter, p_bytes = total, 0.0, a
        per_token_layer = (9 * h + 4 * i) * a
    else:
        targets = set(LINEARS) if "all-linear" in cfg.adapter.target_modules else \
            {m for m in cfg.adapter.target_modules if m in LINEARS}
        shapes = arch.shapes()
        r = cfg.adapter.r
        if cfg.adapter.type == "flix":  # a LoRA per value: the summed rank (the values come from the data)
            r = flix_total_rank(cfg)
        trainable = arch.layers * sum(r * (shapes[m][0] + shapes[m][1])
                                      + (shapes[m][1] if cfg.adapter.dora else 0) for m in targets)
        p_bytes = 4  # peft keeps adapter weights in fp32 under a 16-bit base
        adapter = trainable * p_bytes
        per_token_layer = (7 * h + 3 * i) * a
        if cfg.adapter.dropout > 0:  # each adapted linear keeps its dropped-out input and mask
            per_token_layer += sum(shapes[m][0] for m in targets) * (a + 1)
    if a < 4:  # the RMSNorms compute in fp32: two fp32 copies of h per layer
        per_token_layer += 2 * 4 * h
    loss = tokens * arch.vocab * (a + (0 if a == 4 else 4) + 4 + 4)
    activations = tokens * arch.layers * per_token_layer + loss
    activations_ckpt = tokens * arch.layers * h * a + tokens * per_token_layer + loss
    mult, fixed = OPTIMIZER_STATE.get(cfg.train.optimizer, (2, None))
    optimizer = trainable * (fixed if fixed is not None else mult * p_bytes)
    return Estimate(name=name, total_params=total + (trainable if cfg.adapter.type != "full" else 0),
                    trainable_params=trainable, bits=int(bits), weights=weights, adapter=adapter,
                    gradients=trainable * p_bytes, optimizer=optimizer, activations=activations,
                    activations_ckpt=activations_ckpt, overhead=GPU_OVERHEAD if device == "gpu" else 0.0,
                    checkpointing=bool(cfg.train.gradient_checkpointing), batch=batch, seq=seq)


def estimates(cfg) -> list[Estimate]:
    """One estimate per model the run trains (each expert of an experiment)."""
    if not cfg.experts:
        return [estimate(cfg, cfg.model.name)]
    return [estimate(expert_config(cfg, name), name) for name in ([cfg.expert] if cfg.expert else list(cfg.experts))]


def fit_resources(cfg, launcher: dict) -> dict:
    """Launcher values for one point from its estimate: host memory for the job, and with
    GPUs the gres of the smallest GPU that holds the peak (plan.gres names them)."""
    ests = estimates(cfg)
    worst = max(ests, key=lambda e: e.peak)
    # Host memory: the weights pass through it once at load time (16-bit), plus the process.
    host = max(e.total_params * 2 + (0 if cfg.plan.device == "gpu" else e.peak) for e in ests) * 1.25 + 3 * GIB
    out = {"mem_gb": max(1, math.ceil(host / GIB)), "mem_per_cpu": None}
    if launcher.get("gpus_per_node"):
        size = worst.fits(cfg.plan.gpus)
        if size is None:
            raise ConfigError(f"plan.fit: {worst.name} needs ~{worst.peak / 1e9:.0f} GB, more than the "
                              f"largest of plan.gpus ({max(cfg.plan.gpus)} GB); use quant=4bit, "
                              "train.gradient_checkpointing=true or a smaller train.batch_size")
        gres = cfg.plan.gres.get(str(size))
        if gres:
            out.update(gres=gres, gpus_per_node=None)
    return out


def _gb(n: float) -> str:
    return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def table(rows: list[tuple[str, Estimate]], gpus) -> str:
    head = ["point", "model", "trains", "trainable", "total", "bits", "weights", "adapter", "grads",
            "optim", "acts", "acts ckpt", "peak GiB", "fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point, e in rows:
        size = e.fits(gpus)
        lines.append("| " + " | ".join([
            point, e.name, "full" if e.adapter == 0 else "lora", _count(e.trainable_params),
            _count(e.total_params), str(e.bits), _gb(e.weights), _gb(e.adapter), _gb(e.gradients),
            _gb(e.optimizer), _gb(e.activations) + ("" if e.checkpointing else " *"),
            _gb(e.activations_ckpt) + (" *" if e.checkpointing else ""), _gb(e.peak),
            f"{size} GB" if size else f"> {max(gpus)} GB"]) + " |")
    return "\n".join(lines)


def show(points: list[tuple[str, object]], multirun: bool) -> None:
    """The table for (label, config) of every point."""
    rows = []
    for n, (label, cfg) in enumerate(points):
        rows += [(f"#{n} {label or n}" if multirun else label or str(n), e) for e in estimates(cfg)]
    first, e0 = points[0][1], rows[0][1]
    device = "GPU (bf16 compute)" if first.plan.device == "gpu" else "CPU (fp32)"
    print(f"memory per {device} device, batch {e0.batch} x length {e0.seq}; GiB; * = the config's "
          f"activation checkpointing setting (train.gradient_checkpointing)")
    print(table(rows, list(first.plan.gpus)))
