"""Which tasks an eval runs, resolved from names without importing lm-eval or torch.

A task name is looked up, in this order, in the user's `eval.include_path`, in polyft's own
task families (polyft/eval/tasks: the demo tasks, XL-Sum and XTREME-UP), then among the task YAMLs
shipped inside lm-eval. lm-eval's own TaskManager index parses all ~14k YAMLs (about 7 s);
a text scan for `task:` lines finds the same files in about half a second, and the one
file found is then parsed and checked. Every task becomes a TaskSpec: the YAML it comes
from, its merged config (includes resolved, `!function` left as text), its language, and
polyft's few-shot and limit settings. Nothing here imports lm-eval, torch or datasets.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polyft.data import xtremeup
from polyft.data.synthetic import LANGS as SYNTHETIC_LANGS
from polyft.errors import PolyftError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# The keys of an eval.tasks entry (a bare name is {name: NAME}): lang; num_fewshot and limit
# (this task's, over eval.*); dataset (the hub id the task reads, for local copies and
# messages); apply_chat_template (this task's prompts as chat turns); task (the task feature
# a FLix adapter is composed with for this task).
ENTRY_KEYS = ("name", "lang", "num_fewshot", "limit", "dataset", "apply_chat_template", "task")

# XL-Sum's dataset configs are English language names; polyft tasks use ISO 639-1 codes.
XLSUM_CONFIGS = {
    "am": "amharic", "ar": "arabic", "az": "azerbaijani", "bn": "bengali", "my": "burmese",
    "zh": "chinese_simplified", "en": "english", "fr": "french", "gu": "gujarati", "ha": "hausa",
    "hi": "hindi", "ig": "igbo", "id": "indonesian", "ja": "japanese", "rn": "kirundi",
    "ko": "korean", "ky": "kyrgyz", "mr": "marathi", "ne": "nepali", "om": "oromo", "ps": "pashto",
    "fa": "persian", "pcm": "pidgin", "pt": "portuguese", "pa": "punjabi", "ru": "russian",
    "gd": "scottish_gaelic", "sr": "serbian_cyrillic", "si": "sinhala", "so": "somali",
    "es": "spanish", "sw": "swahili", "ta": "tamil", "te": "telugu", "th": "thai", "ti": "tigrinya",
    "tr": "turkish", "uk": "ukrainian", "ur": "urdu", "uz": "uzbek", "vi": "vietnamese",
    "cy": "welsh", "yo": "yoruba",
}
# FLORES-200 codes (Belebele task names) of the languages the suites use, to ISO 639-1.
FLORES_TO_ISO = {
    "swh_Latn": "sw", "tel_Telu": "te", "ben_Beng": "bn", "jpn_Jpan": "ja", "eng_Latn": "en",
    "deu_Latn": "de", "fra_Latn": "fr", "spa_Latn": "es", "rus_Cyrl": "ru", "zho_Hans": "zh",
    "tha_Thai": "th", "hin_Deva": "hi", "arb_Arab": "ar", "amh_Ethi": "am", "hau_Latn": "ha",
    "yor_Latn": "yo", "ind_Latn": "id", "tur_Latn": "tr", "vie_Latn": "vi",
}


@dataclass(frozen=True)
class Family:
    """polyft's own tasks: `<prefix>_<lang>` for each language, all including one template."""

    prefix: str
    template: Path
    langs: dict  # lang -> hub dataset config, or None when polyft generates or reads the data
    generator: str | None = None  # polyft.data.synthetic generator of the (demo) data
    xtremeup_task: str | None = None  # the XTREME-UP task whose local release files it reads
    test_rows: int | None = None  # generated test rows per language; None: the demo's 50


FAMILIES = (
    Family("demo_arith", TASKS_DIR / "demo" / "arith.yaml", dict.fromkeys(SYNTHETIC_LANGS), "arithmetic"),
    Family("demo_words", TASKS_DIR / "demo" / "words.yaml", dict.fromkeys(SYNTHETIC_LANGS), "instructions"),
    # Short-answer tasks with 200 test rows per language (powered tables, exp=swap_powered_*):
    # toy_arith (toy MGSM, digits), toy_wordarith (operands as number words), toy_numbers.
    Family("toy_arith", TASKS_DIR / "demo" / "arith.yaml", dict.fromkeys(SYNTHETIC_LANGS), "arithmetic",
           test_rows=200),
    Family("toy_wordarith", TASKS_DIR / "demo" / "arith.yaml", dict.fromkeys(SYNTHETIC_LANGS),
           "arithmetic_words", test_rows=200),
    Family("toy_numbers", TASKS_DIR / "demo" / "arith.yaml", dict.fromkeys(SYNTHETIC_LANGS), "numbers",
           test_rows=200),
    # Number words as 4-way multiple choice, 200 rows (powered tables): scored by loglikelihood,
    # so a model that never learned an answer format (a continued-pretraining model) is scored too.
    Family("toy_words", TASKS_DIR / "demo" / "words.yaml", dict.fromkeys(SYNTHETIC_LANGS), "instructions",
           test_rows=200),
    Family("polyft_xlsum", TASKS_DIR / "xlsum" / "xlsum.yaml", XLSUM_CONFIGS),
    *(Family(f"xtremeup_{task}", TASKS_DIR / "xtremeup" / f"{task}.yaml", dict.fromkeys(xtremeup.LANGUAGES[task]),
             xtremeup_task=task) for task in xtremeup.TASKS),
)


@dataclass
class TaskSpec:
    name: str
    lang: str | None
    source: Path  # the YAML the task comes from: lm-eval's, polyft's template or the user's
    config: dict  # its merged config; `!function` values are text
    num_fewshot: int | None = None  # polyft's setting; None: the task's own (0 if unset)
    limit: int | None = None
    dataset: str | None = None  # a per-task local copy (directory of <split>.jsonl files)
    family: Family | None = None
    overrides: dict = field(default_factory=dict)  # keys the generated task YAML sets
    data_files: dict = field(default_factory=dict)  # split -> local file it reads
    chat: bool = False  # prompts rendered with the chat template (lm_eval's default: no)
    task: str | None = None  # the entry's `task` feature (FLix adapters route on it)

    @property
    def fewshot(self) -> int:
        if self.num_fewshot is not None:
            return self.num_fewshot
        return int(self.config.get("num_fewshot") or 0)

    @property
    def family_lang(self) -> str | None:
        """The language a polyft family task is built for: its name's suffix (the row label
        `lang` may be set to something else in the suite)."""
        return self.name[len(self.family.prefix) + 1:] if self.family is not None else None

    @property
    def task_feature(self) -> str | None:
        """The `task` value training rows of this task carry (XTREME-UP: the task name), for
        adapters that route on features."""
        if self.task:
            return self.task
        return self.family.xtremeup_task if self.family is not None else None

    def get(self, key: str, default: Any = None) -> Any:
        """A config value as the generated task will have it (polyft's overrides first)."""
        return self.overrides[key] if key in self.overrides else self.config.get(key, default)


# ---------------------------------------------------------------- YAML, as lm-eval reads it

class FunctionRef(str):
    """A `!function` value: the module path and name, kept as text (never imported here)."""


def _loader(base_dir: Path):
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = type("TaskLoader", (base,), {})
    loader.add_constructor("!function",
                           lambda ld, node: FunctionRef(f"{base_dir}/{ld.construct_scalar(node)}"))
    return loader


def load_task_yaml(path: str | os.PathLike, _seen: frozenset = frozenset()) -> dict:
    """A task YAML with its `include`s merged the way lm-eval merges them (local keys win)."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise PolyftError(f"{path}: include cycle")
    try:
        with open(path, "rb") as fh:
            cfg = yaml.load(fh, Loader=_loader(path.parent))  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise PolyftError(f"{path}: cannot read task YAML ({type(exc).__name__})") from None
    if not isinstance(cfg, dict):
        raise PolyftError(f"{path}: a task YAML must hold a mapping")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        inc_cfg = load_task_yaml(inc_path, _seen | {path})
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    merged.update(cfg)
    return merged


# ---------------------------------------------------------------- indexes

_TASK_LINE = re.compile(r"""^["']?task["']?[ \t]*:[ \t]*["']?([^\s"'#\[\]{},]+)""", re.M)
_GROUP_LINE = re.compile(r"""^["']?(?:group|tag)["']?[ \t]*:[ \t]*["']?([^\s"'#\[\]{},]+)""", re.M)
_INDEX_CACHE: dict[str, tuple[dict, set]] = {}


def lm_eval_tasks_dir() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def scan_dir(root: Path) -> tuple[dict[str, Path], set[str]]:
    """{task name: YAML path} and the group/tag names, from the `task:` lines of the files.

    Cached per process: the CLI's check and the command run in the same process."""
    key = str(root)
    if key not in _INDEX_CACHE:
        tasks: dict[str, Path] = {}
        groups: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", ".ipynb_checkpoints"))
            for name in sorted(filenames):
                if not name.endswith("yaml"):  # include-only files are named like `cot_yaml`
                    continue
                f = Path(dirpath) / name
                text = f.read_bytes().decode("utf-8", "replace")
                if name.endswith(".yaml"):  # lm-eval indexes tasks from *.yaml only
                    for m in _TASK_LINE.finditer(text):
                        tasks.setdefault(m.group(1), f)
                groups.update(m.group(1) for m in _GROUP_LINE.finditer(text))
        _INDEX_CACHE[key] = (tasks, groups)
    return _INDEX_CACHE[key]


def _find_in(root: Path, name: str) -> tuple[Path, dict] | None:
    path = scan_dir(root)[0].get(name)
    if path is None:
        return None
    cfg = load_task_yaml(path)
    if cfg.get("task") != name or "group" in cfg:
        return None
    return path, cfg


def _family_task(name: str) -> tuple[Family, str] | None:
    for fam in FAMILIES:
        if name.startswith(fam.prefix + "_"):
            lang = name[len(fam.prefix) + 1:]
            # XTREME-UP languages are whatever the local release holds (checked against it later)
            if lang not in fam.langs and not (fam.xtremeup_task and lang):
                raise PolyftError(f"eval.tasks: unknown task {name}; {fam.prefix} exists for languages: "
                                  f"{', '.join(sorted(fam.langs))}")
            return fam, lang
    return None


def _unknown(name: str, roots: list[Path]) -> PolyftError:
    known, groups = set(), set()
    for root in roots:
        t, g = scan_dir(root)
        known.update(t)
        groups.update(g)
    if name in groups:
        return PolyftError(f"eval.tasks: {name} is an lm-eval group or tag, not a task; name its tasks "
                           f"one by one (tags such as mgsm_cot_native pull in unrelated tasks)")
    known.update(f"{f.prefix}_{lang}" for f in FAMILIES for lang in f.langs)
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = "lm-eval, polyft's tasks" + (" or eval.include_path" if len(roots) > 1 else "")
    return PolyftError(f"eval.tasks: unknown task {name} (not in {where}){hint}")


# ---------------------------------------------------------------- languages

_TRAILING_LANG = re.compile(r"_([a-z]{2})$")
_TRAILING_FLORES = re.compile(r"_([a-z]{3}_[A-Z][a-z]{3})$")


def task_language(name: str, config: dict | None = None) -> str | None:
    """The language of a task: its config's metadata.lang if given, else a trailing _xx."""
    meta = (config or {}).get("metadata")
    if isinstance(meta, dict):
        for key in ("lang", "language"):
            if isinstance(meta.get(key), str):
                return meta[key]
    m = _TRAILING_FLORES.search(name)
    if m:
        return FLORES_TO_ISO.get(m.group(1), m.group(1))
    m = _TRAILING_LANG.search(name)
    return m.group(1) if m else None


# ---------------------------------------------------------------- resolving a task list

def normalize_entry(entry: Any) -> dict:
    """A task entry as a dict with every ENTRY_KEYS key (a bare name is allowed)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(entry)
    return {k: entry.get(k) for k in ENTRY_KEYS}


def resolve_tasks(entries: list, *, langs: list[str] | None = None, include_path: str | None = None,
                  num_fewshot: int | None = None, limit: int | None = None,
                  apply_chat_template: bool | None = None) -> list[TaskSpec]:
    """TaskSpecs for a suite's task entries; eval-wide num_fewshot/limit/apply_chat_template
    win over an entry's."""
    roots = []
    if include_path:
        user = Path(include_path).expanduser().resolve()
        if not user.is_dir():
            raise PolyftError(f"eval.include_path={include_path}: no such directory")
        roots.append(user)
    lm_root = lm_eval_tasks_dir()
    if lm_root is None:
        raise PolyftError("lm-eval is not installed; pip install lm-eval==0.4.13")
    roots.append(lm_root)

    specs, seen = [], set()
    for raw in entries:
        e = normalize_entry(raw)
        name = e["name"]
        if name in seen:
            raise PolyftError(f"eval.tasks: {name} is listed twice")
        seen.add(name)
        found = _find_in(roots[0], name) if include_path else None
        family = None
        if found is None:
            fam = _family_task(name)
            if fam is not None:
                family, fam_lang = fam
                found = family.template, load_task_yaml(family.template)
                e["lang"] = e["lang"] or fam_lang
        if found is None:
            found = _find_in(lm_root, name)
        if found is None:
            raise _unknown(name, roots)
        source, config = found
        specs.append(TaskSpec(
            name=name, lang=e["lang"] or task_language(name, config), source=source, config=config,
            num_fewshot=num_fewshot if num_fewshot is not None else e["num_fewshot"],
            limit=limit if limit is not None else e["limit"], dataset=e["dataset"], family=family,
            chat=bool(apply_chat_template if apply_chat_template is not None else e["apply_chat_template"]),
            task=e["task"]))
    return select_languages(specs, langs)


def select_languages(specs: list[TaskSpec], langs: list[str] | None) -> list[TaskSpec]:
    if not langs:
        return specs
    have = sorted({s.lang for s in specs if s.lang})
    unknown = [lang for lang in langs if lang not in have]
    if unknown:
        raise PolyftError(f"eval.langs: {', '.join(unknown)} not in this suite; its languages: "
                          f"{', '.join(have) or '(none)'}")
    return [s for s in specs if s.lang in langs]
