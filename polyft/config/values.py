"""Every key's allowed values, in one table, checked before anything runs.

`VALUES` maps each key of the composed config to its rule (polyft.checks: Number, OneOf,
Flag, Items, Custom); `FREE` lists the keys that take any text (names, paths, ids), each
with why. `*` stands for any entry of a mapping (a source, a feature type, a GPU size) and
`[]` for any item of a list. Names a library defines are checked against the library's own
list (scheduler and optimizer names, attention implementations), read when a
config is checked. Rules between keys (a LoRA needs a rank, a swap fits the model's depth)
are polyft.config.rules'; launcher values are polyft.cli.launchers'.

An experiment's experts (`experts.NAME.GROUP.KEY`) and baselines (`baselines.NAME.KEY`) are
checked by the rules of GROUP.KEY and merge.KEY, under their own names. Every key of the
schema and of conf/ has an entry here: tests/test_config_values.py fails for a new key that
has none.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polyft.adapters.flix import FEATURE_TYPES
from polyft.checks import Custom, Flag, Items, Number, OneOf, Text, is_list, is_mapping, library_names
from polyft.data.xtremeup import TASKS
from polyft.errors import ConfigError, PolyftError
from polyft.eval.specs import ENTRY_KEYS
from polyft.merge import registry
from polyft.merge.io import DTYPE_NAMES, parse_size
from polyft.merge.layer_swap import NON_LAYER
from polyft.merge.lorahub import OBJECTIVES
from polyft.merge.ties import SIGN_TIES
from polyft.models.load import DTYPES
from polyft.models.tiny import ARCHS
from polyft.sharding import QUANT_STORAGE, STATE_DICT_TYPES

GROUPS = ("model", "adapter", "quant", "data", "train")  # what an expert may set


def schedulers() -> tuple:
    return library_names("transformers.trainer_utils", "SchedulerType")


def optimizers() -> tuple:
    return library_names("transformers.training_args", "OptimizerNames")


def attention() -> tuple:
    # transformers accepts eager and the attention functions it registers
    return ("eager", *library_names("transformers.modeling_utils", "AttentionInterface._global_mapping"))


def _eval_batch_size(key: str, value: Any) -> None:
    factor = value[5:] if isinstance(value, str) and value.startswith("auto:") else "1"
    if not ((isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            or (isinstance(value, str) and value.split(":")[0] == "auto" and factor.replace(".", "", 1).isdigit())):
        raise ConfigError(f"{key}={value} is not allowed; use a positive integer or auto (auto:N)")


def _size(key: str, value: Any) -> None:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, str)) and parse_size(value) > 0
    except PolyftError:  # parse_size's own error names merge.shard_size; this one names `key`
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value} is not allowed; give a size > 0 such as 2GB, 500MB or 1GiB")


def _shots(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, str) and not is_mapping(value):
        raise ConfigError(f"{key}={value} is not allowed; give a jsonl file, a data option name or a "
                          "data config mapping")


_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|hpu|npu|mtia)(:\d+)?$")


def _device(key: str, value: Any) -> None:
    if value is not None and not (isinstance(value, str) and _DEVICE.match(value)):
        raise ConfigError(f"{key}={value} is not allowed; give a torch device such as cpu, cuda or cuda:1 (or null)")


def _memory(key: str, value: Any) -> None:
    try:
        ok = value is None or (not isinstance(value, bool) and isinstance(value, (int, str)) and parse_size(value) > 0)
    except PolyftError:
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value} is not allowed; give a size such as 70GiB or 40GB (or null)")


def _alpha(key: str, value: Any) -> None:
    """LoRA: a number > 0; FLix: one per feature type (checked by polyft.config.rules)."""
    if is_mapping(value) or value is None:  # null beside adapter.alpha_ratio
        return
    POSITIVE.check(key, value)


def _tasks(key: str, value: Any) -> None:
    if not is_list(value):
        raise ConfigError(f"{key}={value} is not allowed; give a list of task names or entries")
    for i, entry in enumerate(value):
        _task_entry(f"{key}[{i}]", entry)


def _task_entry(shown: str, entry) -> None:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not is_mapping(entry) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ConfigError(f"{shown}={entry} is not allowed; give a task name or {{name: ..., lang: ...}}")
    for k, v in entry.items():
        if k not in ENTRY_KEYS:
            raise ConfigError(f"{shown}.{k}: unknown key; allowed keys: {', '.join(ENTRY_KEYS)}")
        rule_for(f"eval.tasks[].{k}").check(f"{shown}.{k}", v)


POSITIVE = Number(0, low_open=True)
COUNT = Number(1, integer=True)  # 1, 2, ...

VALUES: dict[str, Any] = {
    # run-level keys
    "seed": Number(integer=True),
    "offline": Flag(null=True),
    "allow_pickle": Flag(),
    "merge_back": Flag(),
    "verbose": Flag(),
    "resources.*": Custom(lambda k, v: None, "a launcher key (polyft.cli.launchers checks it with the launcher's)"),
    # model
    "model.tiny.arch": OneOf(ARCHS),
    "model.tiny.hidden_size": COUNT, "model.tiny.intermediate_size": COUNT,
    "model.tiny.num_layers": COUNT, "model.tiny.num_heads": COUNT, "model.tiny.num_kv_heads": COUNT,
    "model.tiny.vocab_size": Number(64, integer=True),
    "model.tiny.max_position_embeddings": Number(16, integer=True), "model.tiny.seed": Number(integer=True),
    "model.trust_remote_code": Flag(),
    "model.num_layers": Number(1, integer=True, null=True),
    "model.dtype": OneOf(DTYPES),
    "model.attn_implementation": OneOf(attention, null=True, source="transformers' attention implementations"),
    "model.chat_template": OneOf(("model", "plain", "auto")),
    "model.hidden_size": Number(1, integer=True, null=True),
    "model.intermediate_size": Number(1, integer=True, null=True),
    "model.num_heads": Number(1, integer=True, null=True),
    "model.num_kv_heads": Number(1, integer=True, null=True),
    "model.vocab_size": Number(1, integer=True, null=True),
    "model.tie_embeddings": Flag(),
    # adapter
    "adapter.type": OneOf(("full", "lora", "flix")),
    "adapter.r": COUNT,
    "adapter.alpha": Custom(_alpha, "a number > 0, or one per feature type for adapter=flix", ("abc", 0, -1)),
    "adapter.alpha.*": POSITIVE,
    "adapter.alpha_ratio": Number(0, low_open=True, null=True),
    "adapter.dropout": Number(0, 1, high_open=True),
    "adapter.target_modules": Items(Text("a module name, or all-linear", null=False), empty=False),
    "adapter.rslora": Flag(),
    "adapter.dora": Flag(),
    "adapter.features": Items(OneOf(FEATURE_TYPES), empty=False),
    "adapter.ranks.*": COUNT,
    "adapter.feature_dropout": Number(0, 1, high_open=True),
    # quant
    "quant.bits": OneOf((4, 8), null=True),
    "quant.quant_type": OneOf(("nf4", "fp4")),
    "quant.double_quant": Flag(),
    "quant.compute_dtype": OneOf(DTYPES),
    "quant.quant_storage": OneOf(QUANT_STORAGE, null=True),
    # data
    "data.sources.*.type": OneOf(("synthetic", "jsonl", "parquet", "csv", "hub", "xtremeup")),
    "data.sources.*.task": OneOf(TASKS, null=True),
    "data.sources.*.n": Number(0, integer=True),
    "data.sources.*.weight": POSITIVE,
    "data.sources.*.max_rows": Number(1, integer=True, null=True),
    "data.sources.*.validation": Flag(),
    "data.validation_ratio": Number(0, 1, high_open=True),
    "data.temperature": POSITIVE,
    "data.num_examples": Number(1, integer=True, null=True),
    "data.max_length": Number(8, low_open=True, integer=True),
    "data.packing": Flag(),
    "data.seed": Number(integer=True),
    # train
    "train.max_steps": Number(-1, integer=True),  # -1: train.epochs decide (0: rules.py)
    "train.epochs": Number(0),
    "train.lr": POSITIVE,
    "train.batch_size": COUNT,
    "train.grad_accum": COUNT,
    "train.scheduler": OneOf(schedulers, source="transformers.SchedulerType"),
    "train.warmup_ratio": Number(0, 1, high_open=True),
    "train.weight_decay": Number(0),
    "train.optimizer": OneOf(optimizers, source="transformers.training_args.OptimizerNames"),
    "train.max_grad_norm": Number(0),  # 0: no clipping
    "train.save_steps": COUNT,
    "train.save_total_limit": Number(1, integer=True, null=True),
    "train.eval_steps": Number(1, integer=True, null=True),
    "train.logging_steps": COUNT,
    "train.gradient_checkpointing": Flag(),
    "train.precision": OneOf(("auto", "fp32", "bf16", "fp16")),
    "train.num_processes": COUNT,
    "train.distributed": OneOf(("ddp", "fsdp", "deepspeed")),
    "train.fsdp.wrap_layer_cls": Items(Text("a module class name", null=False), null=True, empty=False),
    "train.fsdp.reshard_after_forward": Flag(),
    "train.fsdp.cpu_offload": Flag(),
    "train.fsdp.cpu_ram_efficient_loading": Flag(),
    "train.fsdp.state_dict_type": OneOf(tuple(STATE_DICT_TYPES)),
    "train.fsdp.activation_checkpointing": Flag(null=True),
    # logger
    "logger.name": OneOf(("wandb", "tensorboard", "none")),
    "logger.mode": OneOf(("offline", "online", "disabled"), null=True),  # null: WANDB_MODE, else offline
    # merge (each method's rules between keys: polyft.merge.registry)
    "merge.method": OneOf(registry.names),
    "merge.weights": Items(Number(gradient=True), null=True),
    "merge.normalize": Flag(),
    "merge.sign_tie": OneOf(SIGN_TIES),
    "merge.scale": Number(gradient=True),
    "merge.density": Number(0, 1, low_open=True, gradient=True),
    "merge.slack": Number(0, 1),
    "merge.seed": Number(integer=True),
    "merge.t": Number(0, 1, gradient=True),
    "merge.bottom": Number(0, integer=True), "merge.top": Number(0, integer=True),
    "merge.transition_bottom": Number(0, integer=True), "merge.transition_top": Number(0, integer=True),
    "merge.blend": Items(Number(0)),
    "merge.non_layer": OneOf(NON_LAYER),
    "merge.data": Custom(_shots, "a jsonl file, a data option name or a data config mapping", (["a"], 5)),
    "merge.budget": COUNT,
    "merge.bounds": Items(Number()),
    "merge.l1": Number(0),
    "merge.batch_size": Number(1, integer=True, null=True),
    "merge.objective": OneOf(OBJECTIVES),
    "merge.max_length": Number(8, low_open=True, integer=True, null=True),
    "merge.dtype": OneOf(tuple(DTYPE_NAMES), null=True),
    "merge.shard_size": Custom(_size, "a size such as 2GB", ("lots", "0GB", 0)),
    "merge.vocab": OneOf(("strict", "first")),
    # eval
    "eval.tasks": Custom(_tasks, "a list of task names or entries {name: ..., lang: ...}", ("abc", [5])),
    "eval.tasks[].num_fewshot": Number(0, integer=True, null=True),
    "eval.tasks[].limit": Number(1, integer=True, null=True),
    "eval.tasks[].apply_chat_template": Flag(null=True),
    "eval.backend": OneOf(("hf", "vllm")),
    "eval.batch_size": Custom(_eval_batch_size, "a positive integer or auto (auto:N)", ("lots", 0, "auto:x")),
    "eval.limit": Number(1, integer=True, null=True),
    "eval.num_fewshot": Number(0, integer=True, null=True),
    "eval.log_samples": Flag(),
    "eval.device": Custom(_device, "a torch device (cpu, cuda, cuda:1)", ("gpu0", "cuda:x")),
    "eval.apply_chat_template": Flag(null=True),
    "eval.parallelize": Flag(),
    "eval.max_memory_per_gpu": Custom(_memory, "a size such as 70GiB, or null", ("lots", "0GB")),
    "eval.max_cpu_memory": Custom(_memory, "a size such as 200GiB, or null", ("lots", "0GB")),
    "eval.tensor_parallel_size": COUNT,
    "eval.data_parallel_size": COUNT,
    "report.stderr": Flag(),
    # plan
    "plan.device": OneOf(("gpu", "cpu")),
    "plan.batch_size": Number(1, integer=True, null=True),
    "plan.seq_len": Number(1, integer=True, null=True),
    "plan.gpus": Items(POSITIVE, empty=False),
    "plan.fit": Flag(),
}

# Keys that take any text, and why. Whether the path, option, expert or column exists is
# checked where it is read: the commands' preflight, before anything is written.
def _name(why: str) -> Text:
    return Text(why, null=False)


def _optional(why: str) -> Text:
    return Text(why, null=True)


def _names(why: str, null: bool = False) -> Items:
    return Items(Text(why, null=False), null=null)


FREE: dict[str, Any] = {
    "command": _name("set by the CLI from the command name"),
    "output_root": _name("a directory"),
    "output_dir": _optional("a directory"),
    "exp_name": _optional("the experiment's name, set by its file"),
    "expert": _optional("an expert of the experiment (rules check it against experts)"),
    "expert_root": Custom(lambda k, v: None, "set by polyft for an expert's config, not by users"),
    "config_dirs": _names("directories, set by the CLI from --config-dir, ./conf and hydra.searchpath"),
    "model.name": _name("a name for products and tables"),
    "model.path": _optional("a hub id, a local directory or a .gguf file"),
    "model.gguf_file": _optional("a file name inside model.path or the package"),
    "model.package": _optional("an installed distribution's name"),
    "model.revision": _optional("a hub branch, tag or commit"),
    "adapter.init_from": _optional("an adapter directory or an expert"),
    "adapter.match": _optional("an expert with adapter=flix"),
    "quant.name": _name("the option's name, for products and tables"),
    "data.name": _name("the option's name, for products and tables"),
    "data.languages": _names("language codes, which any source's rows may carry", null=True),
    "data.sources.*.path": _optional("a file, a directory or a hub dataset id"),
    "data.sources.*.generator": _optional("a synthetic generator (rules.check_data checks it with the type)"),
    "data.sources.*.langs": _names("languages: rules.check_data checks synthetic ones, a release's files its own"),
    "data.sources.*.hub_config": _optional("a hub dataset's config name"),
    "data.sources.*.data_files": _optional("a file of the dataset"),
    "data.sources.*.split": _name("a split of the dataset (a hub dataset names its own)"),
    "data.sources.*.features.*": _name("a feature value (a task or language name) the rows get"),
    "data.sources.*.lang_field": _optional("a column of the source"),
    "data.sources.*.where.*": _name("a value of that column"),
    "data.sources.*.prompt_field": _optional("a column of the source"),
    "data.sources.*.input_field": _optional("a column of the source"),
    "data.sources.*.response_field": _name("a column of the source"),
    "data.sources.*.messages_field": _optional("a column of chats ({role, content} lists)"),
    "data.sources.*.system": _optional("a system prompt, any text"),
    "train.name": _name("the option's name, for products and tables"),
    "train.deepspeed_config": _optional("a DeepSpeed JSON file"),
    "logger.project": _name("a wandb project name"),
    "merge.name": _optional("the product's name"),
    "merge.models": _names("model references: base, an expert, a merge or a directory"),
    "merge.base": _optional("a model reference"),
    "merge.middle": _optional("a model reference"),
    "merge.outer": _optional("a model reference"),
    "merge.adapters": _names("LoRA directories or experts"),
    "merge.prompt_field": _name("a column of the few-shot file"),
    "merge.response_field": _name("a column of the few-shot file"),
    "merge.optimizer": _name("a nevergrad optimizer: merge=lorahub's preflight checks it against nevergrad's "
                             "registry, as nevergrad takes seconds to import"),
    "merge.config_source": _optional("a model reference"),
    "merge.tokenizer_source": _optional("a model reference"),
    "merge.adapter": _optional("a FLix adapter directory or expert"),
    "merge.features.*": _optional("a feature value of the FLix adapter (its flix_config.json lists them)"),
    "eval.suite": _name("the option's name, for products and tables"),
    "eval.tasks[].name": _name("a task lm-eval or polyft knows (the eval preflight resolves it)"),
    "eval.tasks[].lang": _optional("the task's language code, for tables"),
    "eval.tasks[].dataset": _optional("a directory holding the task's data files"),
    "eval.tasks[].task": _optional("a FLix feature value"),
    "eval.model": _optional("a model reference"),
    "eval.models": _names("model references", null=True),
    "eval.data_dir": _optional("a directory"),
    "eval.xtremeup_root": _optional("a directory"),
    "eval.include_path": _optional("a directory of task YAMLs"),
    "eval.gen_kwargs.*": Custom(lambda k, v: None, "lm-eval's generation arguments, passed to the model as given"),
    "eval.langs": _names("language codes of the suite's tasks", null=True),
    "report.dir": _optional("a directory"),
    "report.metric": _optional("a metric name of the results"),
    "report.out": _optional("a directory"),
    "report.groups.*": _names("task names"),
    "report.compare": _optional("a table row to compare the others with (rules check it is not blank)"),
    "name": _optional("a trained product's name (rules._check_name checks its characters)"),
    "plan.gres.*": _name("a SLURM gres (rules._check_plan checks it with plan.gpus)"),
}


def pattern_of(key: str) -> str:
    """The table's key for a key of a composed config: mapping entries as `*`, list items as `[]`."""
    parts = key.split(".")
    out = []
    for i, part in enumerate(parts):
        prefix = ".".join(out)
        if prefix in ("data.sources", "adapter.ranks", "adapter.alpha", "merge.features", "eval.gen_kwargs",
                      "report.groups", "plan.gres", "resources") \
                or prefix.endswith((".features", ".where")) and prefix.startswith("data.sources."):
            out.append("*")
        else:
            out.append(re.sub(r"\[\d+\]", "[]", part))
    return ".".join(out)


def rule_for(key: str) -> Any:
    """The rule of a key (a pattern of the table or a composed key), or None."""
    pattern = key if key in VALUES or key in FREE else pattern_of(key)
    return VALUES.get(pattern) or FREE.get(pattern)


def _plain(node):
    """A node as plain values, interpolations resolved; one that resolves only when the job
    runs (${hydra:...}) stays as written, and is not checked."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException:
        return OmegaConf.to_container(node, resolve=False, throw_on_missing=False)


def check_group(group: str, node) -> None:
    """One group's keys (a data config read on its own)."""
    for k, v in _plain(node).items():
        _walk(f"{group}.{k}", v, f"{group}.{k}")


def check_values(cfg: DictConfig) -> None:
    """Every key of a composed config (its experts' and baselines' too) against its rule."""
    for key in cfg:
        if key == "hydra":  # Hydra's own node (run dirs, launcher: polyft.cli.launchers)
            continue
        try:
            value = _plain(cfg[key])
        except OmegaConfBaseException:  # a value that resolves when the job runs: as written
            value = OmegaConf.to_container(cfg, resolve=False)[key]
        if key == "experts":
            for name, spec in (value or {}).items():
                _check_expert(f"experts.{name}", spec)
        elif key == "baselines":
            for name, spec in (value or {}).items():
                if not is_mapping(spec):
                    raise ConfigError(f"baselines.{name}={spec} is not allowed; give a merge config mapping")
                for k, v in spec.items():
                    _walk(f"merge.{k}", v, f"baselines.{name}.{k}")
        else:
            _walk(key, value, key)


def _check_expert(where: str, spec) -> None:
    if not is_mapping(spec):
        raise ConfigError(f"{where}={spec} is not allowed; give a mapping of group overrides, "
                          f"e.g. {{data: demo_math, train: {{lr: 1e-3}}}}")
    for group, node in spec.items():
        if group not in GROUPS:
            raise ConfigError(f"{where}.{group}: not a trainable group; allowed: {', '.join(GROUPS)}")
        if is_mapping(node):  # a group option's name is looked up by polyft.config.experiment
            for k, v in node.items():
                _walk(f"{group}.{k}", v, f"{where}.{group}.{k}")


def _walk(key: str, value, shown: str) -> None:
    """Check `value` at `key` (reported as `shown`) by its rule, or each of its entries."""
    rule = rule_for(key)
    if isinstance(value, str) and value.startswith("${"):  # resolved when the job runs
        return
    if rule is not None:
        rule.check(shown, value)
        if is_mapping(value) and isinstance(rule, Custom):
            for k, v in value.items():  # e.g. adapter.alpha given per feature type
                if rule_for(f"{key}.{k}") is not None:
                    _walk(f"{key}.{k}", v, f"{shown}.{k}")
        return
    if is_mapping(value):
        for k, v in value.items():
            _walk(f"{key}.{k}", v, f"{shown}.{k}")
        return
    if value is None:  # an optional group node (model.tiny)
        return
    raise ConfigError(f"{shown}: unknown key; `polyft COMMAND --cfg job` shows the keys there are")
