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

Several processes (train.num_processes = the world size, spread over hydra.launcher.nodes):
the figures are per GPU for the layout the config trains with (`layout_of`): DDP keeps a
whole copy per GPU plus its gradient buckets; FSDP (full shard) and ZeRO-3 shard parameters,
gradients and optimizer state over the GPUs and gather a few units at a time; ZeRO-2 shards
gradients and optimizer state only; CPU offload moves the shards to host memory. Below the
table a comparison gives the per-GPU peak of each layout over 1 to 16+ GPUs, and the host
memory per node. The formulas, and where they differ from the ZeRO paper's, are in
docs/plan.md; tests/test_plan_layouts.py checks them against published figures.

`plan.fit=true` under the SLURM launcher: polyft.cli.launchers calls `fit_resources` for every
point and submits it with what it returns: mem_gb (host memory per node), the GPUs per node
(gpus_per_node, or plan.gres's GPU type with the count set to the processes per node) and
the nodes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from polyft.commands.multinode import per_node
from polyft.errors import ConfigError
from polyft.models.load import model_config_json, resolve_model_path
from polyft.products import expert_config, flix_total_rank

GIB = 2 ** 30
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_OVERHEAD = 1 * GIB
PROCESS_HOST = 3 * GIB  # host memory of one training process beside the weights: libraries, CUDA, data
DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "conf" / "deepspeed"
# What the shipped DeepSpeed configs hold, for when their files are not there to read:
# name -> (ZeRO stage, parameters offloaded, optimizer state offloaded)
DEEPSPEED_SHIPPED = {"zero2": (2, False, False), "zero3": (3, False, False), "zero3_offload": (3, True, True)}
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


@dataclass(frozen=True)
class Layout:
    """How the processes of one training hold its states. kind: single (one process), ddp,
    fsdp (full shard), fsdp_grad_op (train.fsdp.reshard_after_forward=false), zero0..zero3
    (DeepSpeed's ZeRO stage)."""
    kind: str = "single"
    processes: int = 1
    nodes: int = 1
    offload_params: bool = False  # FSDP cpu_offload (with the optimizer), ZeRO-3 offload_param
    offload_optimizer: bool = False  # with the gradients: FSDP cpu_offload, ZeRO offload_optimizer
    ram_efficient_loading: bool = False  # FSDP: one process per node reads the checkpoint

    @property
    def per_node(self) -> int:
        return self.processes // self.nodes

    def label(self) -> str:
        name = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP full shard", "fsdp_grad_op": "FSDP shard grad+optimizer",
                "zero0": "DeepSpeed (ZeRO-0)", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[self.kind]
        off = [w for w, on in (("parameters", self.offload_params), ("optimizer", self.offload_optimizer)) if on]
        if off:
            name += " + CPU offload" if self.kind.startswith("fsdp") else f" + offload ({', '.join(off)})"
        where = f"{self.nodes} nodes x {self.per_node} GPUs" if self.nodes > 1 else f"{self.processes} GPU" + \
            ("s" if self.processes > 1 else "")
        return f"{name} over {where}"


# The layouts the comparison below the table shows, at several GPU counts.
COMPARED = (Layout("ddp"), Layout("fsdp"), Layout("fsdp", offload_params=True, offload_optimizer=True),
            Layout("zero2"), Layout("zero3"), Layout("zero3", offload_params=True, offload_optimizer=True))


def _deepspeed(ref: str) -> tuple[int, bool, bool]:
    """(ZeRO stage, parameters offloaded, optimizer offloaded) of train.deepspeed_config: a
    shipped config's name or a DeepSpeed JSON file."""
    f = DEEPSPEED_DIR / f"{ref}.json"
    if "/" in ref or ref.endswith(".json") or not f.is_file():
        f = Path(ref).expanduser()
    if not f.is_file():
        if ref in DEEPSPEED_SHIPPED:
            return DEEPSPEED_SHIPPED[ref]
        raise ConfigError(f"train.deepspeed_config={ref}: no such file; give a DeepSpeed JSON file or a shipped "
                          f"config: {', '.join(DEEPSPEED_SHIPPED)}")
    try:
        zero = json.loads(f.read_text(encoding="utf-8"))["zero_optimization"]
        stage = int(zero["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        stage = None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed_config={ref}: not a DeepSpeed JSON config with "
                          "zero_optimization.stage 0, 1, 2 or 3")
    off = {part: (zero.get(f"offload_{part}") or {}).get("device", "none") in ("cpu", "nvme")
           for part in ("param", "optimizer")}
    return stage, off["param"] and stage == 3, off["optimizer"]


def layout_of(cfg, launcher: dict | None = None) -> Layout:
    """The layout `cfg` trains with: train.num_processes processes (the world size) over the
    launcher's nodes, train.distributed and its settings (train.fsdp.*, the DeepSpeed config)."""
    t = cfg.train
    nodes = int((launcher or {}).get("nodes") or 1)
    n = int(t.num_processes)
    per_node(n, nodes)  # refuses a world size the nodes do not divide, as train does
    if t.distributed == "deepspeed" and not t.deepspeed_config:
        raise ConfigError(f"train.distributed=deepspeed needs train.deepspeed_config: a shipped config "
                          f"({', '.join(DEEPSPEED_SHIPPED)}) or a DeepSpeed JSON file")
    if n == 1:
        return Layout("single", 1, nodes)
    if t.distributed == "fsdp":
        f = t.get("fsdp") or {}
        offload = bool(f.get("cpu_offload", False))
        kind = "fsdp" if f.get("reshard_after_forward", True) else "fsdp_grad_op"
        return Layout(kind, n, nodes, offload, offload, bool(f.get("cpu_ram_efficient_loading", False)))
    if t.distributed == "deepspeed":
        stage, off_params, off_optim = _deepspeed(str(t.deepspeed_config))
        return Layout(f"zero{stage}", n, nodes, off_params, off_optim)
    return Layout("ddp", n, nodes)


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
    gathered: float = 0.0  # working buffers: units gathered from their shards, or DDP's gradient buckets
    host: float = 0.0  # states offloaded to host memory, per process
    loaded: float = 0.0  # host memory of one process reading the checkpoint
    layout: Layout = Layout()

    @property
    def peak(self) -> float:
        acts = self.activations_ckpt if self.checkpointing else self.activations
        return self.weights + self.adapter + self.optimizer + self.gathered + max(acts, self.gradients) + self.overhead

    def fits(self, gpus) -> int | None:
        """The smallest GPU size that holds the peak. Sizes as sold ("80 GB") are binary: an
        A100 80GB has 81920 MiB, an RTX 4090 24564 MiB (nvidia-smi), so g GiB each."""
        return next((g for g in sorted(gpus) if self.peak <= g * GIB), None)


def _bytes(dtype: str, device: str) -> int:
    if dtype in ("float32", "fp32") or (dtype == "auto" and device == "cpu"):
        return 4
    return 2


def estimate(cfg, name: str = "", layout: Layout | None = None, launcher: dict | None = None) -> Estimate:
    """The memory per GPU of training `cfg` (a composed run config) with `layout` (default:
    the config's own, over the launcher's nodes)."""
    arch = architecture(cfg.model, cfg.output_root)
    single = _one_device(cfg, name, arch)
    layout = layout or layout_of(cfg, launcher)
    return single if layout.kind == "single" else per_gpu(single, cfg, arch, layout)


def _one_device(cfg, name: str, arch: Arch) -> Estimate:
    """Everything on one device, as one process trains."""
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
    # Loading, a process holds the checkpoint in 16-bit, or a quantised base at its bits
    # (bitsandbytes quantises it tensor by tensor as it reads)
    loaded = weights if cfg.quant.bits else total * 2
    return Estimate(name=name, total_params=total + (trainable if cfg.adapter.type != "full" else 0), loaded=loaded,
                    trainable_params=trainable, bits=int(bits), weights=weights, adapter=adapter,
                    gradients=trainable * p_bytes, optimizer=optimizer, activations=activations,
                    activations_ckpt=activations_ckpt, overhead=GPU_OVERHEAD if device == "gpu" else 0.0,
                    checkpointing=bool(cfg.train.gradient_checkpointing), batch=batch, seq=seq)


def per_gpu(one: Estimate, cfg, arch: Arch, layout: Layout) -> Estimate:
    """`one` (everything on one device) as each GPU of `layout` holds it. Bytes per trained
    parameter (weight + gradient + optimizer): one process and DDP train the model as loaded
    (16-bit on a GPU: pure bf16, 2 + 2 + 4 for AdamW); FSDP's mixed precision keeps fp32
    masters (accelerate upcasts the trained parameters: 4 + 4 + 8); DeepSpeed's bf16 keeps
    16-bit weights and gradients and an fp32 master beside the optimizer state (the ZeRO
    paper's 2 + 2 + 12). A LoRA's base is frozen: its weights only, at their bits."""
    n, kind = layout.processes, layout.kind
    if kind == "ddp":  # a whole copy each, and gradient buckets as large as the gradients
        return replace(one, gathered=one.gradients, layout=layout)
    a = _bytes(cfg.model.dtype, cfg.plan.device)
    full = cfg.adapter.type == "full"
    trained = one.trainable_params
    mult, fixed = OPTIMIZER_STATE.get(cfg.train.optimizer, (2, None))
    p_bytes = 4 if kind.startswith("fsdp") else a
    master = 0 if kind.startswith("fsdp") else 4
    state = trained * ((fixed if fixed is not None else mult * 4) + master)
    frozen = 0.0 if full else one.weights
    # 4-bit weights shard only when packed into a float dtype (quant_storage); uint8 stays whole
    whole = frozen if cfg.quant.bits == 4 and cfg.quant.get("quant_storage") == "uint8" else 0.0
    # What each kind shards over the n GPUs (ZeRO stage 1: the optimizer state; 2: and the
    # gradients; 3 and FSDP: and the parameters; FSDP grad-op shards its fp32 masters too)
    div = 1 if kind in ("zero0", "zero1", "zero2") else n
    div_grads = 1 if kind in ("zero0", "zero1") else n
    div_optim = 1 if kind == "zero0" else n
    weights = (trained * p_bytes if full else frozen - whole) / div + whole
    adapter = 0.0 if full else trained * p_bytes / div
    # Units in use at once, gathered in the compute dtype: the root (embeddings, head, final
    # norm) and two decoder layers (the one computing, the one prefetched); full fine-tuning
    # also holds a layer's unsharded gradients until they are reduce-scattered.
    _, other = arch.params()
    layer = sum(i * o for i, o in arch.shapes().values()) + 2 * arch.hidden
    if full:
        gathered = other * a + 3 * layer * a
    else:
        gathered = other * a + 2 * ((frozen - other * a) / arch.layers + trained * a / arch.layers)
    if kind == "fsdp_grad_op":  # gathered once per step and kept from forward to backward
        gathered = (trained if full else 0) * a + frozen
    elif kind in ("zero0", "zero1", "zero2"):
        gathered = 0.0
    gradients, optimizer, host = trained * p_bytes / div_grads, state / div_optim, 0.0
    if layout.offload_params:
        host, weights, adapter = weights + adapter, 0.0, 0.0
    if layout.offload_optimizer:
        host, gradients, optimizer = host + gradients + optimizer, 0.0, 0.0
    return replace(one, weights=weights, adapter=adapter, gradients=gradients, optimizer=optimizer,
                   gathered=gathered, host=host, layout=layout)


def estimates(cfg, launcher: dict | None = None) -> list[Estimate]:
    """One estimate per model the run trains (each expert of an experiment)."""
    if not cfg.experts:
        return [estimate(cfg, cfg.model.name, launcher=launcher)]
    return [estimate(expert_config(cfg, name), name, launcher=launcher)
            for name in ([cfg.expert] if cfg.expert else list(cfg.experts))]


def host_per_node(cfg, ests: list[Estimate]) -> float:
    """Host memory of one node, a quarter more for the allocator, plus each process's own:
    the larger of loading (each process reading the checkpoint; one per node with FSDP's
    cpu_ram_efficient_loading, which accelerate skips for a 4-bit base) and training (what
    CPU offload keeps there). On a GPU the loaded copy has moved to the GPU before the
    offloaded states exist; a CPU run trains in host memory on top of what it loaded."""
    def one(e: Estimate) -> float:
        lay = e.layout
        readers = 1 if lay.ram_efficient_loading and cfg.quant.bits != 4 else lay.per_node
        load = readers * e.loaded
        if cfg.plan.device == "cpu":
            held = load + lay.per_node * (e.host + e.peak)
        else:
            held = max(load, lay.per_node * e.host)
        return 1.25 * held + lay.per_node * PROCESS_HOST
    return max(one(e) for e in ests)


def _with_count(gres: str, count: int) -> str:
    """gpu:a100:1 -> gpu:a100:COUNT (plan.gres names the GPU type; the count is the processes per node)."""
    parts = gres.split(":")
    return ":".join(parts[:-1] + [str(count)]) if parts[-1].isdigit() else f"{gres}:{count}"


def requested(cfg, launcher: dict) -> tuple[dict, Estimate, int | None]:
    """(launcher values, the worst estimate, the GPU size that holds it or None) of one
    point: host memory per node and, with GPUs (a GPU plan of several processes, or the
    launcher or plan.gres asking for GPUs), the GPUs per node, over the launcher's nodes."""
    ests = estimates(cfg, launcher)
    worst = max(ests, key=lambda e: e.peak)
    lay = max((e.layout for e in ests), key=lambda x: x.per_node)
    out = {"mem_gb": max(1, math.ceil(host_per_node(cfg, ests) / GIB)), "mem_per_cpu": None, "nodes": lay.nodes}
    size = worst.fits(cfg.plan.gpus)
    if cfg.plan.device == "gpu" and (launcher.get("gpus_per_node") or cfg.plan.gres or lay.processes > 1):
        gres = cfg.plan.gres.get(str(size)) if size else None
        if gres:
            out.update(gres=_with_count(gres, lay.per_node), gpus_per_node=None)
        else:
            out["gpus_per_node"] = lay.per_node
    return out, worst, size


def fit_resources(cfg, launcher: dict) -> dict:
    """Launcher values for one point from its estimate (`requested`); a point whose per-GPU
    peak no GPU of plan.gpus holds is refused."""
    out, worst, size = requested(cfg, launcher)
    if out.get("gpus_per_node") or out.get("gres"):
        if size is None:
            raise ConfigError(f"plan.fit: {worst.name} needs ~{_gb(worst.peak)} GiB per GPU with "
                              f"{worst.layout.label()}, more than the largest of plan.gpus ({max(cfg.plan.gpus)} GB); "
                              "use more GPUs (train.num_processes) with train.distributed=fsdp or deepspeed, "
                              "quant=4bit, train.gradient_checkpointing=true or a smaller train.batch_size")
    return out


def _gb(n: float) -> str:
    return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def table(rows: list[tuple[str, Estimate]], gpus) -> str:
    head = ["point", "model", "trains", "trainable", "total", "bits", "weights", "adapter", "grads",
            "optim", "acts", "acts ckpt", "gathered", "peak GiB", "fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point, e in rows:
        size = e.fits(gpus)
        lines.append("| " + " | ".join([
            point, e.name, "full" if e.trainable_params == e.total_params else "lora", _count(e.trainable_params),
            _count(e.total_params), str(e.bits), _gb(e.weights), _gb(e.adapter), _gb(e.gradients),
            _gb(e.optimizer), _gb(e.activations) + ("" if e.checkpointing else " *"),
            _gb(e.activations_ckpt) + (" *" if e.checkpointing else ""), _gb(e.gathered), _gb(e.peak),
            f"{size} GB" if size else f"> {max(gpus)} GB"]) + " |")
    return "\n".join(lines)


def gpu_counts(processes: int) -> list[int]:
    return sorted({1, 2, 4, 8, 16, processes})


def comparison(cfg, name: str, counts: list[int]) -> str:
    """Per-GPU peak (GiB) of each layout in COMPARED at each GPU count (1: one process)."""
    one = estimate(cfg, name, Layout("single"))
    head = ["layout"] + [f"{c} GPU" + ("s" if c > 1 else "") for c in counts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lay in COMPARED:
        peaks = [one.peak if c == 1 else estimate(cfg, name, replace(lay, processes=c)).peak for c in counts]
        lines.append("| " + " | ".join([lay.label().split(" over ")[0]] + [_gb(p) for p in peaks]) + " |")
    return "\n".join(lines)


def show(points: list[tuple], multirun: bool) -> None:
    """The table for (label, config[, launcher]) of every point, then for each point that
    runs several processes (or under polyft's SLURM launcher) its layout, host memory per
    node, what plan.fit would ask SLURM for, and the per-GPU peak of each layout."""
    rows, details = [], []
    for n, (label, cfg, *rest) in enumerate(points):
        launcher = dict(rest[0]) if rest and rest[0] else {}
        label = f"#{n} {label or n}" if multirun else label or str(n)
        ests = estimates(cfg, launcher)
        rows += [(label, e) for e in ests]
        lay = ests[0].layout
        slurm = "Slurm" in str(launcher.get("_target_", ""))
        if lay.processes > 1 or lay.nodes > 1 or slurm:
            details.append((label, cfg, launcher, ests))
    first, e0 = points[0][1], rows[0][1]
    device = "GPU (bf16 compute)" if first.plan.device == "gpu" else "CPU device (fp32)"
    print(f"memory per {device}, batch {e0.batch} x length {e0.seq} per device; GiB; * = the config's "
          f"activation checkpointing setting (train.gradient_checkpointing)")
    print(table(rows, list(first.plan.gpus)))
    for label, cfg, launcher, ests in details:
        lay = ests[0].layout
        print(f"\n{label}: {lay.label()} (train.num_processes={lay.processes}); host memory per node "
              f"~{_gb(host_per_node(cfg, ests))} GiB" + (f", of which CPU offload {_gb(lay.per_node * max(e.host for e in ests))}"
                                                          if any(e.host for e in ests) else ""))
        fit, worst, size = requested(cfg, launcher)
        gpus = f"gres {fit['gres']}" if fit.get("gres") else \
            f"{fit['gpus_per_node']} GPUs" if fit.get("gpus_per_node") else "no GPU"
        ask = f"{fit['nodes']} node{'s' if fit['nodes'] > 1 else ''} x {gpus} per node, mem_gb={fit['mem_gb']} per node"
        if size is None and gpus != "no GPU":
            print(f"plan.fit would ask SLURM for {ask}, but refuses: ~{_gb(worst.peak)} GiB per GPU is more than "
                  f"the largest of plan.gpus ({max(first.plan.gpus)} GB)")
        else:
            print(f"plan.fit asks SLURM for {ask}")
        for e in ests:
            print(f"per-GPU peak (GiB) of {e.name} by layout and GPU count:")
            print(comparison(expert_config(cfg, e.name) if cfg.experts else cfg, e.name, gpu_counts(lay.processes)))
