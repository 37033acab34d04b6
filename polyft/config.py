"""Typed schemas for every config group, and the one cross-field `validate()`.

The dataclasses are registered in Hydra's ConfigStore as the root schema, so unknown keys
and wrong types fail at compose time. `validate()` holds the rules a type cannot say; it
runs before any heavy import or any write. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from polyft.errors import ConfigError
from polyft.models.tiny import TinySpec

COMMANDS = ("train", "merge", "eval", "run", "report", "plan")
CONF_DIR = Path(__file__).resolve().parent / "conf"  # the shipped options; users add theirs (polyft.compose)


# The tiny offline model's spec is its config group entry (`model.tiny`).
TinyModelConfig = TinySpec


@dataclass
class ModelConfig:
    name: str = MISSING
    path: Optional[str] = None  # hub id, local directory or .gguf file; replaces a tiny model
    tiny: Optional[TinyModelConfig] = None
    gguf_file: Optional[str] = None  # a .gguf file in model.path (a directory) or in `package`
    package: Optional[str] = None  # an installed distribution shipping gguf_file
    revision: Optional[str] = None
    trust_remote_code: bool = False
    num_layers: Optional[int] = None  # known depth of a hub preset, for validating swaps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # The chat template prompts are rendered with (training rows, eval with a chat template):
    # model = the tokenizer's own (refused if it has none); plain = polyft's PLAIN_TEMPLATE.
    chat_template: str = "model"
    # The rest of a hub preset's architecture, for `polyft plan` without its config.json.
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    vocab_size: Optional[int] = None
    tie_embeddings: bool = False


@dataclass
class AdapterConfig:
    type: str = "lora"  # full | lora | flix
    r: int = 8
    alpha: Any = 16.0  # a number; flix: one per feature type, e.g. {task: 16, lang: 8}
    # lora: alpha = alpha_ratio * r, so a rank sweep keeps the scale alpha / r fixed. When set it
    # wins over `alpha` (give alpha: null beside it), and the alpha it gives is the one recorded.
    alpha_ratio: Optional[float] = None
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False
    dora: bool = False
    init_from: Optional[str] = None  # continue training an existing adapter
    # flix (polyft/adapters/flix.py): one LoRA per value of each feature type
    features: List[str] = field(default_factory=lambda: ["task", "lang"])
    ranks: Dict[str, int] = field(default_factory=dict)  # feature type -> rank, e.g. {task: 16, lang: 8}
    feature_dropout: float = 0.1  # each feature of an example dropped with this probability in training
    # lora: an expert with adapter=flix; r becomes the rank with its parameter count, alpha / r its scale
    match: Optional[str] = None


@dataclass
class QuantConfig:
    name: str = "none"
    bits: Optional[int] = None  # null (no quantisation), 4 or 8
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True
    compute_dtype: str = "auto"


@dataclass
class SourceConfig:
    type: str = "synthetic"  # synthetic | jsonl | parquet | csv | hub | xtremeup
    path: Optional[str] = None  # file for jsonl/parquet/csv, dataset id for hub, release root for xtremeup
    generator: Optional[str] = None  # synthetic: arithmetic | instructions
    task: Optional[str] = None  # xtremeup: semantic_parsing | qa_in_lang | translation
    # synthetic: languages to generate; xtremeup: language files to read (empty: all of the split)
    langs: List[str] = field(default_factory=list)
    n: int = 0  # synthetic: examples per language
    hub_config: Optional[str] = None
    # a file of the dataset to read (e.g. MultiAlpaca's ar.jsonl), where its configs do not split it:
    # hub: a file of the dataset repo; jsonl/parquet/csv: a file in the directory `path` (a local copy)
    data_files: Optional[str] = None
    split: str = "train"
    weight: float = 1.0
    max_rows: Optional[int] = None
    features: Dict[str, str] = field(default_factory=dict)  # fixed features, e.g. {task: math}
    lang_field: Optional[str] = "lang"  # row column holding the language, if any
    where: Dict[str, str] = field(default_factory=dict)  # keep rows whose column equals the value
    prompt_field: Optional[str] = "prompt"  # null: plain text, loss on all of it (continued pretraining)
    input_field: Optional[str] = None  # appended to the prompt when present (Alpaca layout)
    response_field: str = "response"


@dataclass
class DataConfig:
    name: str = MISSING
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    temperature: float = 1.0  # language sampling p_l ~ n_l^(1/T)
    languages: Optional[List[str]] = None  # keep only these languages
    num_examples: Optional[int] = None  # size of the sampled mixture; null: all rows once
    max_length: int = 256
    packing: bool = False
    seed: int = 0


@dataclass
class TrainConfig:
    name: str = MISSING
    max_steps: int = -1
    epochs: float = 1.0
    lr: float = 3e-4
    batch_size: int = 8
    grad_accum: int = 1
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    save_steps: int = 50
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    num_processes: int = 1
    distributed: str = "ddp"  # ddp | fsdp | deepspeed
    deepspeed_config: Optional[str] = None


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | tensorboard | none
    project: str = "polyft"
    mode: str = "offline"


@dataclass
class MergeConfig:
    method: str = "linear"
    name: Optional[str] = None  # product name; default: the method
    models: List[Any] = field(default_factory=list)
    base: Optional[str] = None
    weights: Optional[List[Any]] = None
    normalize: bool = True
    scale: Any = 1.0
    density: Any = 1.0
    slack: float = 0.1
    seed: int = 0
    t: Any = 0.5
    middle: Optional[str] = None
    outer: Optional[str] = None
    bottom: int = 0
    top: int = 0
    transition_bottom: int = 0
    transition_top: int = 0
    blend: List[float] = field(default_factory=lambda: [0.5, 0.5])
    non_layer: str = "average"  # outer | middle | average
    # merge=lorahub (polyft/merge/lorahub.py): LoRAs composed with searched weights
    adapters: List[Any] = field(default_factory=list)  # LoRA directories or expert names
    data: Any = None  # few-shot examples: a jsonl path, a data option name or a data config mapping
    prompt_field: str = "prompt"  # jsonl columns of the few-shot file
    response_field: str = "response"
    budget: int = 40  # candidate evaluations
    bounds: List[float] = field(default_factory=lambda: [-1.5, 1.5])
    l1: float = 0.05  # objective: few-shot loss + l1 * mean |w|
    optimizer: str = "NGOpt"  # a nevergrad optimizer name
    batch_size: int = 8  # few-shot rows per forward pass
    max_length: Optional[int] = None  # tokens per row; default: the data config's (jsonl: 1024)
    dtype: Optional[str] = None  # default: the inputs'
    shard_size: str = "1GB"  # shards are written in parallel, a file per core
    config_source: Optional[str] = None
    tokenizer_source: Optional[str] = None
    vocab: str = "strict"  # strict | first
    # flix_compose: a FLix adapter (directory or expert) and the feature set to compose, {task: T, lang: L}
    adapter: Optional[str] = None
    features: Dict[str, Optional[str]] = field(default_factory=dict)


@dataclass
class EvalTaskConfig:
    name: str = MISSING
    lang: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[int] = None
    dataset: Optional[str] = None  # hub id the task reads, for local copies and messages
    apply_chat_template: Optional[bool] = None  # this task's prompts in the chat template
    task: Optional[str] = None  # the task feature a FLix adapter is composed with for this task


@dataclass
class EvalConfig:
    suite: str = "demo"
    tasks: List[Any] = field(default_factory=list)  # task names, or {name, lang, num_fewshot, limit, dataset}
    model: Optional[str] = "base"
    models: Optional[List[str]] = None
    data_dir: Optional[str] = None
    xtremeup_root: Optional[str] = None  # unpacked XTREME-UP release: <root>/<task>/<split>/<lang>.jsonl
    include_path: Optional[str] = None
    backend: str = "hf"  # hf | vllm
    batch_size: Any = 8
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    log_samples: bool = False
    device: Optional[str] = None
    gen_kwargs: Dict[str, Any] = field(default_factory=dict)
    langs: Optional[List[str]] = None  # keep only the suite's tasks in these languages
    # Prompts in the model's chat template (model.chat_template): true/false for every task;
    # null: each task entry's own apply_chat_template, else false (as lm_eval runs tasks).
    apply_chat_template: Optional[bool] = None


@dataclass
class ReportConfig:
    dir: Optional[str] = None  # a run or sweep directory to report on; default: the experiment's runs
    metric: Optional[str] = None  # default: each task's first metric
    out: Optional[str] = None  # default: <output_root>/reports/<exp_name>
    groups: Dict[str, List[str]] = field(default_factory=dict)  # e.g. {seen: [tasks], held_out: [tasks]}: a table by group


@dataclass
class PlanConfig:
    device: str = "gpu"  # gpu: bf16 compute, as training on a GPU; cpu: fp32, as on CPU
    batch_size: Optional[int] = None  # default: train.batch_size
    seq_len: Optional[int] = None  # default: data.max_length
    gpus: List[int] = field(default_factory=lambda: [24, 40, 80])  # GPU sizes (GB) to fit
    fit: bool = False  # SLURM launcher: mem_gb (and gres) of each point from its estimate
    gres: Dict[str, str] = field(default_factory=dict)  # plan.fit: GPU size -> gres, e.g. {"80": "gpu:a100:1"}


@dataclass
class RootConfig:
    command: str = "train"
    seed: int = 0
    output_root: str = "outputs"
    output_dir: Optional[str] = None
    offline: Optional[bool] = None  # null: offline when HF_HUB_OFFLINE=1 or the hub is unreachable
    allow_pickle: bool = False
    merge_back: bool = False
    verbose: bool = False  # dependency logs and warnings on the console too (always in <run dir>/polyft.log)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Launcher values for this run, over hydra.launcher; Hydra cannot sweep hydra.* keys, so
    # per-point resources go here: -m +resources.mem_gb=16,64 (polyft's submitit launchers)
    resources: Dict[str, Any] = field(default_factory=dict)
    exp_name: Optional[str] = None
    experts: Dict[str, Any] = field(default_factory=dict)  # name -> overrides of the groups
    expert: Optional[str] = None  # train only this expert
    expert_root: Optional[Dict[str, Any]] = None  # set by experiment.expert_cfg: the root's groups
    baselines: Dict[str, Any] = field(default_factory=dict)  # name -> merge config, beside `merge`
    # The user's config directories, searched after polyft's conf/ (set by the CLI from
    # --config-dir, ./conf and hydra.searchpath), where an expert's `data: NAME` is found too.
    config_dirs: List[str] = field(default_factory=list)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if "polyft_schema.yaml" not in store.repo:  # once per process: building the node is not free
        store.store(name="polyft_schema", node=RootConfig)


def option_file(group: str, name: str, config_dirs=()) -> Path | None:
    """conf/<group>/<name>.yaml in polyft's conf, else in the first user directory holding it."""
    if "/" in name:
        return None
    for d in [CONF_DIR, *map(Path, config_dirs)]:
        f = d / group / f"{name}.yaml"
        if f.is_file():
            return f
    return None


def option_names(group: str, config_dirs=()) -> list[str]:
    return sorted({f.stem for d in [CONF_DIR, *map(Path, config_dirs)] for f in (d / group).glob("*.yaml")})


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value} is not allowed; use one of: {', '.join(map(str, allowed))}")


def _check_flix(a) -> None:
    from polyft.adapters.flix import FEATURE_TYPES

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
    _choice("adapter.type", a.type, ("full", "lora", "flix"))
    _check_alpha_ratio(a)
    if a.type == "flix":
        _check_flix(a)
    elif a.type != "full":
        if a.r <= 0:
            raise ConfigError(f"adapter.r={a.r} is not allowed; the LoRA rank must be a positive integer")
        if not a.match and a.alpha_ratio is None and (
                isinstance(a.alpha, bool) or not isinstance(a.alpha, (int, float)) or a.alpha <= 0):
            raise ConfigError(f"adapter.alpha={a.alpha} is not allowed; it must be a number > 0 "
                              "(or set adapter.alpha_ratio: alpha = ratio * r)")
        if not 0 <= a.dropout < 1:
            raise ConfigError(f"adapter.dropout={a.dropout} is not allowed; it must be in [0, 1)")
        if not a.target_modules:
            raise ConfigError("adapter.target_modules is empty; name module names or all-linear")


def _check_quant(q) -> None:
    _choice("quant.bits", q.bits, (None, 4, 8))
    _choice("quant.quant_type", q.quant_type, ("nf4", "fp4"))


def _check_data(d) -> None:
    if d.temperature <= 0:
        raise ConfigError(f"data.temperature={d.temperature} is not allowed; it must be > 0")
    if d.max_length <= 8:
        raise ConfigError(f"data.max_length={d.max_length} is not allowed; it must be > 8")
    if not d.sources:
        raise ConfigError(f"data={d.name} has no sources; add at least one under data.sources")
    for name, s in d.sources.items():
        key = f"data.sources.{name}"
        _choice(f"{key}.type", s.type, ("synthetic", "jsonl", "parquet", "csv", "hub", "xtremeup"))
        if s.weight <= 0:
            raise ConfigError(f"{key}.weight={s.weight} is not allowed; mixture weights must be > 0")
        if s.max_rows is not None and s.max_rows <= 0:
            raise ConfigError(f"{key}.max_rows={s.max_rows} is not allowed; it must be > 0")
        if s.type == "synthetic":
            from polyft.data.synthetic import GENERATORS, LANGS

            _choice(f"{key}.generator", s.generator, GENERATORS)
            for lang in s.langs:
                _choice(f"{key}.langs", lang, LANGS)
            if s.n <= 0:
                raise ConfigError(f"{key}.n={s.n} is not allowed; synthetic sources need n > 0")
        elif s.type == "xtremeup":
            from polyft.data.xtremeup import LAYOUT, SPLITS, TASKS

            if not s.path:  # data=xtremeup takes it from eval.xtremeup_root
                raise ConfigError(f"{key}.path is missing; an xtremeup source needs the release root "
                                  f"({LAYOUT}); with data=xtremeup set eval.xtremeup_root=DIR")
            _choice(f"{key}.task", s.task, TASKS)
            _choice(f"{key}.split", s.split, SPLITS)
        elif not s.path:
            raise ConfigError(f"{key}.path is missing; a {s.type} source needs a path or dataset id")
        if s.data_files is not None and s.type not in ("hub", "jsonl", "parquet", "csv"):
            raise ConfigError(f"{key}.data_files={s.data_files} is not allowed with type={s.type}; it names a "
                              "file of a hub dataset, or of the local directory in path (jsonl, parquet, csv)")


def _check_train(t) -> None:
    if t.num_processes < 1:
        raise ConfigError(f"train.num_processes={t.num_processes} is not allowed; it must be >= 1")
    _choice("train.distributed", t.distributed, ("ddp", "fsdp", "deepspeed"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} is not allowed; it must be > 0")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise ConfigError("train.max_steps must be > 0 (or -1 with train.epochs > 0)")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} is not allowed; it must be in [0, 1)")
    if t.save_steps < 1:
        raise ConfigError(f"train.save_steps={t.save_steps} is not allowed; it must be >= 1")


def _check_merge(m) -> None:
    """Choices and ranges of the merge group; polyft.merge.command.check does the files."""
    from polyft.merge import adapter_space
    from polyft.merge.io import parse_size
    from polyft.merge.registry import names

    _choice("merge.method", m.method, tuple(sorted(names() + adapter_space.names())))
    _choice("merge.non_layer", m.non_layer, ("outer", "middle", "average"))
    _choice("merge.vocab", m.vocab, ("strict", "first"))
    _choice("merge.dtype", m.dtype, (None, "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))

    def numbers(key, value, ok=lambda x: True, allowed="a number"):
        """A number, or a non-empty list of numbers (a gradient over layer depth)."""
        values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v)
                             for v in values):
            raise ConfigError(f"{key}={value} is not allowed; use {allowed}, or a list of them "
                              "(anchors spread over layer depth)")

    numbers("merge.density", m.density, lambda x: 0 < x <= 1, "a density in (0, 1]")
    numbers("merge.t", m.t, lambda x: 0 <= x <= 1, "an interpolation factor in [0, 1]")
    numbers("merge.scale", m.scale)
    for i, w in enumerate(m.weights or []):
        numbers(f"merge.weights[{i}]", w)
    if not isinstance(m.slack, (int, float)) or not 0 <= m.slack <= 1:
        raise ConfigError(f"merge.slack={m.slack} is not allowed; use a number in [0, 1]")
    for key in ("bottom", "top", "transition_bottom", "transition_top"):
        if m[key] < 0:
            raise ConfigError(f"merge.{key}={m[key]} is not allowed; a number of layers is >= 0")
    if len(m.blend) != 2 or min(m.blend) < 0 or sum(m.blend) <= 0:
        raise ConfigError(f"merge.blend={list(m.blend)} is not allowed; give [w_middle, w_outer], "
                          "two weights >= 0 with a positive sum")
    if parse_size(m.shard_size) <= 0:
        raise ConfigError(f"merge.shard_size={m.shard_size} is not allowed; it must be > 0")
    if m.method == "lorahub":
        _check_lorahub(m)


def _check_lorahub(m) -> None:
    """Values of merge=lorahub; polyft.merge.lorahub.check does the adapters and the data."""
    if len(m.adapters) < 2:
        raise ConfigError(f"merge.adapters has {len(m.adapters)} adapter(s); merge=lorahub composes two or "
                          "more LoRA directories: merge.adapters=[a,b,...]")
    if m.budget <= 0:
        raise ConfigError(f"merge.budget={m.budget} is not allowed; the number of candidate evaluations must be > 0")
    if len(m.bounds) != 2 or not m.bounds[0] < m.bounds[1]:
        raise ConfigError(f"merge.bounds={list(m.bounds)} is not allowed; give [low, high] with low < high")
    if m.l1 < 0:
        raise ConfigError(f"merge.l1={m.l1} is not allowed; the L1 coefficient must be >= 0")
    if m.batch_size < 1:
        raise ConfigError(f"merge.batch_size={m.batch_size} is not allowed; it must be >= 1")
    if m.max_length is not None and m.max_length <= 8:
        raise ConfigError(f"merge.max_length={m.max_length} is not allowed; it must be > 8 (or null)")
    if m.data is None or (isinstance(m.data, str) and not m.data.strip()):
        raise ConfigError("merge.data is missing; merge=lorahub needs the few-shot examples: a jsonl file "
                          "with prompt and response fields, a data option name or a data config")


def _check_eval(e) -> None:
    """Rules for the eval group (task names, languages, models and data: polyft.eval.command)."""
    _choice("eval.backend", e.backend, ("hf", "vllm"))
    bs = e.batch_size
    factor = bs[5:] if isinstance(bs, str) and bs.startswith("auto:") else "1"
    if not ((isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1)
            or (isinstance(bs, str) and bs.split(":")[0] == "auto" and factor.replace(".", "", 1).isdigit())):
        raise ConfigError(f"eval.batch_size={bs} is not allowed; use a positive integer or auto (auto:N)")
    if e.limit is not None and e.limit < 1:
        raise ConfigError(f"eval.limit={e.limit} is not allowed; it must be >= 1 (or null for all)")
    if e.num_fewshot is not None and e.num_fewshot < 0:
        raise ConfigError(f"eval.num_fewshot={e.num_fewshot} is not allowed; it must be >= 0")
    if not e.tasks:
        raise ConfigError(f"eval={e.suite} has no tasks; list them under eval.tasks")
    for i, t in enumerate(e.tasks):
        entry = {"name": t} if isinstance(t, str) else t
        if not isinstance(entry, (dict, DictConfig)) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"eval.tasks[{i}]={t} is not allowed; give a task name or {{name: ..., lang: ...}}")
        unknown = set(entry) - {"name", "lang", "num_fewshot", "limit", "dataset", "apply_chat_template", "task"}
        if unknown:
            raise ConfigError(f"eval.tasks[{i}].{sorted(unknown)[0]}: unknown key; allowed keys: name, lang, "
                              "num_fewshot, limit, dataset, apply_chat_template, task")
        if entry.get("apply_chat_template") not in (None, True, False):
            raise ConfigError(f"eval.tasks[{i}].apply_chat_template={entry['apply_chat_template']} is not "
                              "allowed; use true or false")
        for key in ("num_fewshot", "limit"):
            v = entry.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (key == "limit")):
                raise ConfigError(f"eval.tasks[{i}].{key}={v} is not allowed; it must be an integer >= {int(key == 'limit')}")
    refs = list(e.models) if e.models is not None else [e.model]
    if not refs or any(not isinstance(r, str) or not r.strip() for r in refs):
        raise ConfigError("eval.model / eval.models: give base or model/adapter paths")
    if len(set(refs)) != len(refs):
        raise ConfigError(f"eval.models lists a model twice: {', '.join(refs)}")
    if e.langs is not None and not e.langs:
        raise ConfigError("eval.langs is empty; give languages (e.g. [sw, te]) or null for all")


def _check_plan(p) -> None:
    _choice("plan.device", p.device, ("gpu", "cpu"))
    for key in ("batch_size", "seq_len"):
        if p[key] is not None and p[key] < 1:
            raise ConfigError(f"plan.{key}={p[key]} is not allowed; it must be >= 1 (or null: the train config's)")
    if not p.gpus or any(g <= 0 for g in p.gpus):
        raise ConfigError(f"plan.gpus={list(p.gpus)} is not allowed; give GPU memory sizes in GB, e.g. [24,40,80]")
    for size in p.gres:
        if not str(size).isdigit() or int(size) not in p.gpus:
            raise ConfigError(f"plan.gres.{size}: not one of plan.gpus ({', '.join(map(str, p.gpus))})")


def _check_flix_data(cfg) -> None:
    if cfg.adapter.type == "flix" and cfg.data.packing:
        raise ConfigError("data.packing=true is not allowed with adapter=flix; packed sequences would mix "
                          "the features of several examples")
    if cfg.adapter.type == "flix" and cfg.merge_back:
        raise ConfigError("merge_back=true is not allowed with adapter=flix; merge one feature set with "
                          "polyft merge merge=flix_compose instead")
    if cfg.adapter.match and cfg.adapter.type != "lora":
        raise ConfigError(f"adapter.match={cfg.adapter.match} is for adapter=lora in an experiment whose experts include {cfg.adapter.match} (adapter=flix)")


def validate(cfg: DictConfig) -> None:
    """Cross-field rules for the groups the command uses. Raises ConfigError (one line).
    An experiment's structure (experts, merges, refs) is polyft.experiment.validate_run's."""
    _choice("command", cfg.command, COMMANDS)
    _choice("logger", cfg.logger.name, ("wandb", "tensorboard", "none"))
    _choice("model.chat_template", cfg.model.chat_template, ("model", "plain"))
    if cfg.command == "plan" or cfg.plan.fit:
        _check_plan(cfg.plan)
    if cfg.command in ("train", "run", "plan"):
        _check_adapter(cfg.adapter)
        _check_quant(cfg.quant)
        _check_data(cfg.data)
        _check_flix_data(cfg)
        _check_train(cfg.train)
    if cfg.command in ("merge", "run"):
        _check_merge(cfg.merge)
    if cfg.command in ("eval", "run"):
        _check_eval(cfg.eval)


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def model_layer_count(model_cfg, resolved_path: str | None = None) -> int | None:
    """Number of transformer layers, from the tiny spec, a local config.json or the preset."""
    from polyft.models.load import builds_tiny

    if builds_tiny(model_cfg):
        return model_cfg.tiny.num_layers
    path = Path(resolved_path or model_cfg.path or "") / "config.json"
    if path.is_file():
        conf = json.loads(path.read_text())
        return conf.get("num_hidden_layers") or conf.get("text_config", {}).get("num_hidden_layers")
    return model_cfg.num_layers
