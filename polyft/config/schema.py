"""Typed schemas for every config group (dataclasses, one per group; names match conf/).

Hydra's ConfigStore holds RootConfig as the root schema, so unknown keys and wrong types fail
at compose time; the rules a type cannot say are polyft.config.rules'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from polyft.models.names import model_name_of
from polyft.models.tiny import TinySpec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the shipped options; users add theirs (polyft.cli.compose)


# model=hf names itself after model.path: name: ${model_name:${.path}}
OmegaConf.register_new_resolver("model_name", model_name_of, replace=True)

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
    # null: transformers' choice (sdpa where the model supports it); eager, sdpa, flash_attention_2, ...
    attn_implementation: Optional[str] = None
    # The chat template prompts are rendered with (training rows, eval with a chat template):
    # model = the tokenizer's own (refused if it has none); plain = polyft's PLAIN_TEMPLATE;
    # auto = the tokenizer's own, else plain (model=hf).
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
    # 4-bit: the dtype bitsandbytes packs the weights into (uint8 | bfloat16 | float16 | float32).
    # null: uint8, or under train.distributed=fsdp the dtype the model loads in, so that FSDP
    # shards the 4-bit weights with the rest (the QLoRA-FSDP recipe; polyft.sharding)
    quant_storage: Optional[str] = None


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
    # A column of chats, [{role: system|user|assistant, content: ...}, ...]: loss on the assistant
    # turns only. Default: `messages` when the source has that column and no prompt_field column.
    messages_field: Optional[str] = None
    system: Optional[str] = None  # a system prompt for every row that has none of its own
    validation: bool = False  # held out: its rows are the validation set, never trained on


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
    # Rows of each source held out as the validation set (eval loss during training)
    validation_ratio: float = 0.0


@dataclass
class FsdpConfig:
    """train.distributed=fsdp (torch's FSDP2 through accelerate), with train.num_processes > 1."""
    # Module classes that each become one FSDP unit; null: the model's own decoder layer
    # (its _no_split_modules, e.g. LlamaDecoderLayer)
    wrap_layer_cls: Optional[List[str]] = None
    # false: keep a unit's gathered parameters from forward to backward (ZeRO-2-like, SHARD_GRAD_OP)
    reshard_after_forward: bool = True
    # parameters, gradients and the optimizer step in host memory (on GPUs; a CPU run is there already)
    cpu_offload: bool = False
    # the shards are filled from rank 0's copy of the checkpoint; the other ranks' copies go to meta
    cpu_ram_efficient_loading: bool = False
    # checkpoints: full (one file, rank 0) | sharded (one file per rank); the product is always whole
    state_dict_type: str = "full"
    # FSDP's own activation checkpointing of each unit; null: train.gradient_checkpointing
    activation_checkpointing: Optional[bool] = None


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
    save_total_limit: Optional[int] = 2  # checkpoints kept while training (the oldest go); null: all
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    num_processes: int = 1
    # ddp | fsdp | deepspeed, with num_processes > 1. train.batch_size is per process: the
    # global batch is batch_size x num_processes x grad_accum
    distributed: str = "ddp"
    # distributed=deepspeed: a shipped config (zero2, zero3, zero3_offload: polyft/conf/deepspeed)
    # or a DeepSpeed JSON file
    deepspeed_config: Optional[str] = None
    eval_steps: Optional[int] = None  # eval loss on the validation set every N steps; null: logging_steps
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | tensorboard | none
    project: str = "polyft"
    mode: Optional[str] = None  # wandb: offline | online | disabled; null: WANDB_MODE, else offline


@dataclass
class MergeConfig:
    method: str = "linear"
    name: Optional[str] = None  # product name; default: the method
    models: List[Any] = field(default_factory=list)
    base: Optional[str] = None
    weights: Optional[List[Any]] = None
    normalize: bool = True
    sign_tie: str = "positive"  # ties, ties_sv, dare_ties: what an exactly tied sign vote elects
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
    batch_size: Optional[int] = None  # few-shot rows per forward pass; null: all shots at once (the authors')
    objective: str = "authors"  # authors: sum of batch-mean CE / shots (lorahub 0.1.0) | token_mean
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
class EvalConfig:
    suite: str = "demo"
    tasks: List[Any] = field(default_factory=list)  # task names, or entries (polyft.eval.specs.ENTRY_KEYS)
    model: Optional[str] = "base"
    models: Optional[List[str]] = None
    data_dir: Optional[str] = None
    xtremeup_root: Optional[str] = None  # unpacked XTREME-UP release: <root>/<task>/<split>/<lang>.jsonl
    include_path: Optional[str] = None
    backend: str = "hf"  # hf | vllm
    batch_size: Any = 8
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    log_samples: bool = True  # per-item scores (samples/): `polyft report report.compare=ROW` pairs them
    device: Optional[str] = None
    gen_kwargs: Dict[str, Any] = field(default_factory=dict)
    langs: Optional[List[str]] = None  # keep only the suite's tasks in these languages
    # Prompts in the model's chat template (model.chat_template): true/false for every task;
    # null: each task entry's own apply_chat_template, else false (as lm_eval runs tasks).
    apply_chat_template: Optional[bool] = None
    # Several GPUs. backend=hf: parallelize=true spreads the model over every visible GPU with
    # accelerate's device_map=auto, as lm-eval's parallelize=True does; max_memory_per_gpu caps
    # each GPU (e.g. 70GiB) and max_cpu_memory lets layers that do not fit stay on the CPU.
    parallelize: bool = False
    max_memory_per_gpu: Any = None
    max_cpu_memory: Any = None
    # backend=vllm: GPUs one engine spans (tensor parallel), engines side by side (data parallel, Ray)
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1


@dataclass
class ReportConfig:
    dir: Optional[str] = None  # a run or sweep directory to report on; default: the experiment's runs
    metric: Optional[str] = None  # default: each task's first metric
    out: Optional[str] = None  # default: <output_root>/reports/<exp_name>
    groups: Dict[str, List[str]] = field(default_factory=dict)  # e.g. {seen: [tasks], held_out: [tasks]}: a table by group
    stderr: bool = False  # true: lm-eval's standard error in each table cell (always in results.csv)
    compare: Optional[str] = None  # a table row: every other row against it on the same items (eval.log_samples)


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
    name: Optional[str] = None  # a trained product's name (default <model>-<adapter>-r<r>[-<quant>]-<data>)
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


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
