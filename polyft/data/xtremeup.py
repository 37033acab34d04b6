"""XTREME-UP (Ruder et al., 2023) from its unpacked release: files, fields and prompts.

XTREME-UP is not on the hub. Its jsonl release unpacks as

    <root>/<task>/<split>/<lang>.jsonl          split: train | validation | test

(translation files may also be named en2<lang>.jsonl, as in the release). Training
sources (`type: xtremeup`) and the eval tasks `xtremeup_<task>_<lang>` both read the files
through this module, so a model is scored on exactly the prompts it was tuned on. Rows
come out as polyft rows {prompt, response, lang, task}; `task` is the XTREME-UP task name,
the feature FLix routes on. No torch, no datasets: the CLI reads sources while checking.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from polyft.data import rows as files
from polyft.errors import PolyftError

LAYOUT = "<root>/<task>/<split>/<lang>.jsonl"
SPLITS = ("train", "validation", "test")
# The fields each task's rows carry in the release.
FIELDS = {
    "semantic_parsing": ("input", "target"),
    "qa_in_lang": ("question", "title", "context", "target"),
    "translation": ("input", "target"),
}
TASKS = tuple(FIELDS)

# Languages of the release per task (its evaluation/constants.py), for task names and hints.
LANGUAGES = {
    "semantic_parsing": ("am be bn bn_cs de de_localized en es fi fr ha hi hi_cs hu ja pt_br ru sw ta "
                         "ta_cs th tr yo zu").split(),
    "qa_in_lang": "ar bn en fi id ko ru sw te".split(),
    "translation": ("af am ar as az be bg bn bs ca ceb ckb cs cy da de el es et fa ff fi fil fr ga gl gu "
                    "ha he hi hr hu hy id ig is it ja jv ka kk km kn ko ky lb lg ln lo lt lv mi mk ml mn "
                    "mr ms mt my ne nl no nso ny om or pa pl ps pt ro ru sd sk sl sn so sr sv sw ta te tg "
                    "th tr uk ur uz vi xh yo zh zu").split(),
}

# English names for the translation instruction ("Translate from English to Swahili.").
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani",
    "be": "Belarusian", "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan",
    "ceb": "Cebuano", "ckb": "Central Kurdish", "cs": "Czech", "cy": "Welsh", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian",
    "ff": "Fula", "fi": "Finnish", "fil": "Filipino", "fr": "French", "ga": "Irish", "gl": "Galician",
    "gu": "Gujarati", "ha": "Hausa", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian",
    "hy": "Armenian", "id": "Indonesian", "ig": "Igbo", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada",
    "ko": "Korean", "ky": "Kyrgyz", "lb": "Luxembourgish", "lg": "Ganda", "ln": "Lingala", "lo": "Lao",
    "lt": "Lithuanian", "lv": "Latvian", "mi": "Maori", "mk": "Macedonian", "ml": "Malayalam",
    "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "ne": "Nepali",
    "nl": "Dutch", "no": "Norwegian", "nso": "Northern Sotho", "ny": "Nyanja", "om": "Oromo",
    "or": "Odia", "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sd": "Sindhi", "sk": "Slovak", "sl": "Slovenian", "sn": "Shona", "so": "Somali",
    "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "tg": "Tajik",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese",
    "xh": "Xhosa", "yo": "Yoruba", "zh": "Chinese", "zu": "Zulu",
}


def prompt(task: str, row: dict, lang: str) -> str:
    """The instruction a model sees for one release row (English instructions, as the
    instruction-tuning data polyft uses; the content stays in its language)."""
    if task == "semantic_parsing":
        return ("Write the semantic parse of this request: its intent and slots in bracket "
                f"notation, e.g. [IN:INTENT [SL:SLOT words ] ].\n\n{row['input']}")
    if task == "qa_in_lang":
        # The question comes last: lm-eval cuts over-long contexts from the left.
        return ("Answer the question with a short span copied from the passage, in the passage's "
                f"language.\n\nTitle: {row['title']}\nPassage: {row['context']}\n\nQuestion: {row['question']}")
    if task == "translation":
        return f"Translate from English to {LANGUAGE_NAMES.get(lang, lang)}.\n\n{row['input']}"
    raise PolyftError(f"unknown XTREME-UP task {task}; known: {', '.join(TASKS)}")


def prompt_digest() -> str:
    """Changes when the prompts change, so cached eval results follow them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


# ---------------------------------------------------------------- files

def _names(directory: Path, suffix: str = "") -> str:
    found = sorted(p.name[: len(p.name) - len(suffix)] if suffix else p.name
                   for p in directory.iterdir() if (p.is_file() if suffix else p.is_dir())
                   and p.name.endswith(suffix))
    return ", ".join(found) or "(none)"


def _lang_of(filename: str) -> str:
    stem = filename[: -len(".jsonl")]
    return stem[3:] if stem.startswith("en2") else stem


def split_dir(root: str, task: str, split: str, what: str) -> Path:
    """<root>/<task>/<split>, or a PolyftError naming the first missing level; `what` names
    the setting the path comes from (e.g. data.sources.sp.path=/data/xtreme_up)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise PolyftError(f"{what}: no such directory (an unpacked XTREME-UP release, {LAYOUT})")
    if task not in FIELDS:
        raise PolyftError(f"{what}: unknown XTREME-UP task {task}; polyft reads: {', '.join(TASKS)}")
    if not (base / task).is_dir():
        raise PolyftError(f"{what}: no task directory {base / task}; tasks there: {_names(base)} ({LAYOUT})")
    if not (base / task / split).is_dir():
        raise PolyftError(f"{what}: no split directory {base / task / split}; splits there: "
                          f"{_names(base / task)} ({LAYOUT})")
    return base / task / split


def languages(directory: Path) -> list[str]:
    """The languages with a file in a split directory."""
    return sorted(_lang_of(p.name) for p in directory.glob("*.jsonl") if p.is_file())


def lang_file(root: str, task: str, split: str, lang: str, what: str) -> Path:
    directory = split_dir(root, task, split, what)
    names = [f"{lang}.jsonl"] + ([f"en2{lang}.jsonl"] if task == "translation" else [])
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise PolyftError(f"{what}: no file {directory / names[0]}; languages there: "
                      f"{', '.join(languages(directory)) or '(none)'}")


def read_file(path: Path, task: str) -> list[dict]:
    """A release file's rows; each must be JSON with the task's fields as strings."""

    rows = []
    for place, row in files.read(path, "jsonl"):
        rows.append({f: files.text(str(path), place, row, f) for f in FIELDS[task]})
    return rows


def to_rows(raw: list[dict], task: str, lang: str) -> list[dict]:
    """polyft rows {prompt, response, lang, task} of release rows in one language."""
    return [{"prompt": prompt(task, r, lang), "response": str(r["target"]), "lang": lang, "task": task}
            for r in raw]


def load(root: str, task: str, split: str, langs: list[str] | None, what: str) -> list[dict]:
    """polyft rows of the given languages (all languages with a file when `langs` is empty)."""
    directory = split_dir(root, task, split, what)
    if not langs:
        langs = languages(directory)
        if not langs:
            raise PolyftError(f"{what}: no <lang>.jsonl files in {directory}")
    rows = []
    for lang in langs:
        rows.extend(to_rows(read_file(lang_file(root, task, split, lang, what), task), task, lang))
    return rows
