"""Where each task's data comes from: generated demo files, local copies, or the hub.

Local copies of hub datasets (eval.data_dir) follow one layout:

    <data_dir>/<hub id with "/" replaced by "__">/<config or "default">/<split>.<ext>

with ext one of jsonl, json, parquet, csv, e.g. `data/juletxara__mgsm/sw/test.jsonl` or
`data/facebook__xnli/sw/validation.jsonl`. Rows keep the hub dataset's field names. A task
entry's `dataset: DIR` points one task at a directory of `<split>.<ext>` files instead.

The task then reads exactly those files: polyft replaces dataset_path/dataset_name/
dataset_kwargs in the task config and keeps everything else. The split it scores (test,
else validation) must be there; the few-shot split only when num_fewshot > 0. A split the
task names but that has no file and is not needed is set to null, because lm-eval would
otherwise open it when the task is built.

Without a local copy a hub dataset is read by lm-eval as usual; offline that needs the HF
datasets cache to hold it, which is checked before anything runs (one line naming the
dataset and how to supply it, instead of a retry stall inside `datasets`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from polyft.checks import library_names
from polyft.data import rows as files
from polyft.data import synthetic, xtremeup
from polyft.data.synthetic import NUMBER_WORDS, generate
from polyft.errors import PolyftError
from polyft.eval.specs import Family, TaskSpec
from polyft.runs import file_lock

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# dataset_path values that are datasets builders reading given files, not hub ids.
BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "generator", "webdataset",
            "imagefolder", "audiofolder", "videofolder"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
LAYOUT = "<data_dir>/<hub id with / as __>/<config or default>/<split>.jsonl"

DEMO_TEST_ROWS = 50  # per language and task
DEMO_FEWSHOT_ROWS = 8
DEMO_SEED = 1000  # not the training data's seed: different draws of the same templates


def local_dir_name(dataset_id: str, config: str | None) -> Path:
    return Path(dataset_id.replace("/", "__")) / (config or "default")


def _split_file(directory: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        f = directory / f"{split}{ext}"
        if f.is_file():
            return f
    return None


def eval_split(spec: TaskSpec) -> str | None:
    return spec.get("test_split") or spec.get("validation_split")


def fewshot_split(spec: TaskSpec) -> str | None:
    fs_conf = spec.get("fewshot_config") or {}
    return (fs_conf.get("split") or spec.get("fewshot_split") or spec.get("training_split")
            or spec.get("validation_split"))


def is_hub_dataset(spec: TaskSpec) -> bool:
    path = spec.get("dataset_path")
    return bool(path) and not spec.get("custom_dataset") and path not in BUILDERS \
        and not Path(str(path)).expanduser().exists()


def use_local_copy(spec: TaskSpec, directory: Path) -> None:
    """Point the task at <split> files in `directory` (see the module docstring)."""
    dataset_id = spec.get("dataset_path")
    needed = [eval_split(spec)] + ([fewshot_split(spec)] if spec.fewshot > 0 else [])
    for split in needed:  # the scored split first: its absence is the one to report
        if split and _split_file(directory, split) is None:
            raise PolyftError(f"task {spec.name}: missing local data file {directory / split}.jsonl "
                              f"(a local copy of {dataset_id}; layout: {LAYOUT})")
    found, builders = {}, set()
    for key in SPLIT_KEYS:
        split = spec.get(key)
        if not split:
            continue
        f = _split_file(directory, split)
        if f is not None:
            found[split] = f
            builders.add(EXTENSIONS[f.suffix])
        else:
            spec.overrides[key] = None
    fs_conf = spec.get("fewshot_config") or {}
    if fs_conf.get("split") and fs_conf["split"] not in found:
        if any(isinstance(v, str) and v.startswith("!function") for v in fs_conf.values()):
            raise PolyftError(f"task {spec.name}: missing local data file {directory / fs_conf['split']}.jsonl")
        spec.overrides["fewshot_config"] = {**fs_conf, "split": None}
    if len(builders) > 1:
        raise PolyftError(f"task {spec.name}: local files in {directory} mix formats; use one of "
                          "jsonl, parquet or csv for all splits")
    spec.data_files = {split: str(f.resolve()) for split, f in found.items()}
    spec.overrides.update(dataset_path=builders.pop(), dataset_name=None,
                          dataset_kwargs={"data_files": dict(spec.data_files)})
    check_local_files(spec)


_FIELD = re.compile(r"\{\{\s*([A-Za-z_]\w*)")
_LOCAL = re.compile(r"\{%-?\s*(?:for|set)\s+([A-Za-z_]\w*)")  # a template's own variables
_KIND = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def template_fields(spec: TaskSpec) -> list[str]:
    """The row fields a task's prompts name: {{field}} in doc_to_text/target/choice, or a
    bare field name as the whole value (a !function's fields are its own business)."""
    out = []
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = spec.get(key)
        if not isinstance(value, str) or value.startswith("!function"):
            continue
        names = _FIELD.findall(value) if "{{" in value else ([value] if value.isidentifier() else [])
        local = set(_LOCAL.findall(value)) | {"loop", "range", "true", "false", "none", "True", "False", "None"}
        out += [n for n in names if n not in out and n not in local]
    return out


def check_local_files(spec: TaskSpec) -> None:
    """A local copy's files, before lm-eval reads them: UTF-8, rows that are JSON objects
    (jsonl), not empty, and every row holding the fields the task's prompts name. Their
    types are the task's business: a null answer, a label number and a list of choices are
    all fields real datasets have (MGSM's test answers are null)."""
    fields = template_fields(spec)
    for path in spec.data_files.values():
        label = f"task {spec.name}: {path}"
        kind = _KIND.get(Path(path).suffix)
        if kind is None:  # .json: one JSON document, read by datasets
            files.decoded(Path(path), label)
            continue
        for place, row in files.read(path, kind, label):
            for name in fields:
                if name not in row:
                    raise PolyftError(f"{label}: {place} has no field {name}, which the task's prompts use "
                                      f"(its fields: {', '.join(map(str, row))})")


def output_types() -> tuple:
    return library_names("lm_eval.api.task", "ALL_OUTPUT_TYPES")


def hub_cached(dataset_id: str, config: str | None) -> bool:
    """Whether the HF caches hold this dataset (the datasets cache for its config, or a hub
    snapshot), so that `datasets` can load it offline. Directory checks only."""
    from huggingface_hub import constants

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE")
                          or Path(constants.HF_HOME) / "datasets")
    if (datasets_cache / dataset_id.replace("/", "___") / (config or "default")).is_dir():
        return True
    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset_id.replace('/', '--')}" / "snapshots").is_dir()


def plan_data(specs: list[TaskSpec], *, data_dir: str | None, demo_root: Path, offline: bool,
              xtremeup_root: str | None = None) -> None:
    """Decide where every task reads its data; raise PolyftError when that cannot work."""
    for spec in specs:
        kind = spec.get("output_type")
        if kind is not None and kind not in output_types():
            raise PolyftError(f"task {spec.name} ({spec.source}): output_type={kind} is not one of lm-eval's: "
                              f"{', '.join(output_types())}")
        if spec.family is not None:
            spec.overrides["task"] = spec.name
            if spec.family.xtremeup_task:
                xtremeup_files(spec, xtremeup_root)
                continue
            config = spec.family.langs[spec.family_lang]
            if spec.family.generator:
                demo_files(spec, demo_root)
                continue
            spec.overrides["dataset_name"] = config
        if not is_hub_dataset(spec):
            continue
        dataset_id, config = spec.get("dataset_path"), spec.get("dataset_name")
        if spec.dataset:
            directory = Path(spec.dataset).expanduser().resolve()
            if not directory.is_dir():
                raise PolyftError(f"task {spec.name}: dataset={spec.dataset}: no such directory "
                                  "(a local copy holding <split>.jsonl files)")
            use_local_copy(spec, directory)
        elif data_dir:
            use_local_copy(spec, Path(data_dir).expanduser().resolve() / local_dir_name(dataset_id, config))
        elif offline and not hub_cached(dataset_id, config):
            example = local_dir_name(dataset_id, config) / f"{eval_split(spec)}.jsonl"
            raise PolyftError(
                f"task {spec.name} reads the hub dataset {dataset_id} (config {config or 'default'}) and "
                f"polyft is offline; save a local copy as DIR/{example} and set eval.data_dir=DIR, "
                "or run with network access")


# ---------------------------------------------------------------- XTREME-UP

def xtremeup_files(spec: TaskSpec, root: str | None) -> None:
    """Point an xtremeup_<task>_<lang> task at the release files it scores (test) and takes
    few-shot examples from (train, only when num_fewshot > 0). The task's loader
    (tasks/xtremeup/utils.py) turns them into prompts with polyft.data.xtremeup."""

    task, lang = spec.family.xtremeup_task, spec.family_lang
    if not root:
        raise PolyftError(f"task {spec.name} reads a local XTREME-UP release; set eval.xtremeup_root=DIR "
                          f"(layout {xtremeup.LAYOUT})")
    what = f"task {spec.name}: eval.xtremeup_root={root}"
    found = {"test": xtremeup.lang_file(root, task, "test", lang, what)}
    if spec.fewshot > 0:
        found["train"] = xtremeup.lang_file(root, task, "train", lang, what)
    for f in found.values():  # refused now, not when lm-eval loads it
        xtremeup.read_file(f, task)
    spec.data_files = {split: str(f.resolve()) for split, f in found.items()}
    fewshot = "train" if "train" in found else None
    spec.overrides.update(
        training_split=fewshot, fewshot_split=fewshot,
        dataset_kwargs={"xtremeup_task": task, "xtremeup_lang": lang, "data_files": dict(spec.data_files)},
        # the prompts are code: their digest enters the eval key, so cached results follow them
        metadata={**(spec.config.get("metadata") or {}), "lang": spec.lang,
                  "prompts": xtremeup.prompt_digest()})


# ---------------------------------------------------------------- demo data

def _synthetic_digest() -> str:
    """Changes when polyft's synthetic data code changes, so cached demo files follow it."""

    h = hashlib.sha256(Path(synthetic.__file__).read_bytes())
    h.update(f"{DEMO_TEST_ROWS}:{DEMO_FEWSHOT_ROWS}:{DEMO_SEED}".encode())
    return h.hexdigest()[:12]


def demo_files(spec: TaskSpec, demo_root: Path) -> None:
    """Point a demo task at its (not necessarily existing yet) data files."""
    rows = spec.family.test_rows
    directory = Path(demo_root).resolve() / _synthetic_digest() / (f"{spec.name}-{rows}" if rows else spec.name)
    spec.data_files = {"test": str(directory / "test.jsonl"), "train": str(directory / "train.jsonl")}
    spec.overrides.update(dataset_path="json", dataset_name=None,
                          dataset_kwargs={"data_files": dict(spec.data_files)})


def demo_rows(family: Family, lang: str, n: int, seed: int) -> list[dict]:
    """Rows of a demo task; the instruction rows get four choices, one of them right."""

    rows = generate(family.generator, [lang], n, seed)
    if family.generator != "instructions":
        return rows
    out = []
    for i, row in enumerate(rows):
        rng = random.Random(f"demo-choices:{lang}:{seed}:{i}")
        choices = rng.sample([w for w in NUMBER_WORDS[lang] if w != row["response"]], 3)
        label = rng.randrange(4)
        choices.insert(label, row["response"])
        out.append({**row, "choices": choices, "label": label})
    return out


def write_demo_data(spec: TaskSpec) -> None:
    """Generate a demo task's files once (atomic: written aside, then renamed)."""

    test = Path(spec.data_files["test"])
    directory = test.parent
    if test.exists():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(directory.parent / f".{directory.name}.lock"):
        if test.exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
        try:
            n_test = spec.family.test_rows or DEMO_TEST_ROWS
            for split, n, seed in (("test", n_test, DEMO_SEED), ("train", DEMO_FEWSHOT_ROWS, DEMO_SEED + 1)):
                rows = demo_rows(spec.family, spec.family_lang, n, seed)
                (tmp / f"{split}.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            os.rename(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def file_identity(path: str) -> list:
    """What a cached eval result depends on for one data file: its content when small."""
    p = Path(path)
    if not p.exists():
        return [str(p), None]
    st = p.stat()
    if st.st_size <= 64 << 20:
        return [str(p), hashlib.sha256(p.read_bytes()).hexdigest()[:16]]
    return [str(p), st.st_size, st.st_mtime_ns]
