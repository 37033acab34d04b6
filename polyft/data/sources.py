"""Read one data source into plain rows: {prompt, response, lang, task}, or chats
{messages: [{role, content}, ...], lang, task} (a `messages` column, system prompts included).

A source is synthetic (generated here), a local jsonl/parquet/csv file, a hub dataset id,
or an unpacked XTREME-UP release (polyft/data/xtremeup.py). Field names map the source's
columns onto prompt/response; features (lang, task) come from fixed values or from a
column (XTREME-UP: the task and each file's language). `data_files` names one file of a hub
dataset whose configs do not split it (MultiAlpaca: <lang>.jsonl), and the same file in a
local copy of it (a directory in `path`). No torch here: the CLI reads
sources while checking a config, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from polyft.data import rows as files
from polyft.data import xtremeup
from polyft.data.synthetic import generate
from polyft.errors import PolyftError


def _read_hub(key: str, src, offline: bool) -> list[tuple[str, dict]]:
    if offline:
        if src.data_files:  # a copy of the repo's files: the same source, read from a directory
            raise PolyftError(
                f"{key}.path={src.path} is a hub dataset but polyft is offline; save its files in a "
                f"directory and set {key}.type=jsonl {key}.path=DIR (reads DIR/{src.data_files})")
        raise PolyftError(
            f"{key}.path={src.path} is a hub dataset but polyft is offline; save a local copy "
            f"(jsonl, parquet or csv) and set {key}.type=jsonl {key}.path=/path/to/file")
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.hub_config, data_files=src.data_files, split=src.split)
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's to fix
        raise PolyftError(f"{key}.path={src.path}: could not load from the hub ({type(exc).__name__}); "
                          "check the id, config and split, or use a local copy") from None
    return [(f"row {i}", dict(r)) for i, r in enumerate(ds, 1)]


def raw_rows(key: str, src, seed: int, offline: bool) -> tuple[str, list[tuple[str, dict]]]:
    """(label, [(place, row)]): the source's rows as stored, before field mapping, and the
    name its messages give it (the file, for a file)."""
    if src.type == "synthetic":
        return key, [(f"row {i}", r) for i, r in enumerate(generate(src.generator, list(src.langs), src.n, seed), 1)]
    if src.type == "hub":
        return f"{key}.path={src.path}", _read_hub(key, src, offline)
    path = Path(src.path).expanduser()
    if src.data_files:
        if not path.is_dir():
            raise PolyftError(f"{key}.path={src.path}: not a directory; with {key}.data_files={src.data_files} "
                              f"it is the directory holding that file (or set {key}.data_files=null)")
        path = path / src.data_files
        if not path.is_file():
            raise PolyftError(f"{key}.data_files={src.data_files}: no such file in {src.path}")
    elif not path.is_file():
        raise PolyftError(f"{key}.path={src.path}: no such file (a local {src.type} file is expected)")
    label = f"{key}: {path}"
    return label, files.read(path, src.type, label)


def _xtremeup_rows(key: str, src) -> list[dict]:
    rows = xtremeup.load(src.path, src.task, src.split, list(src.langs), f"{key}.path={src.path}")
    fixed = {k: v for k, v in src.features.items() if k in ("lang", "task")}
    return [{**r, **fixed, "source": key.rsplit(".", 1)[-1]} for r in rows]


ROLES = ("system", "user", "assistant")


def messages_column(src, columns: set) -> str | None:
    """The column of chats: messages_field, else `messages` when the source has that column
    and no prompt column (a chat jsonl needs no field mapping)."""
    if src.messages_field:
        return src.messages_field
    if "messages" in columns and (not src.prompt_field or src.prompt_field not in columns):
        return "messages"
    return None


def _chat(value, where: str) -> list[dict]:
    """A row's chat, checked: a list of {role, content} with at least one assistant turn."""
    if isinstance(value, str):  # csv holds it as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise PolyftError(f"{where}: not a list of messages (text that is not JSON)") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise PolyftError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            got = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise PolyftError(f"{where}[{i}]: role={got}; each message needs a role ({', '.join(ROLES)}) "
                              "and a text content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise PolyftError(f"{where}: no assistant turn with content; the loss is on assistant turns only")
    return out


def _chat_rows(key: str, label: str, src, rows: list[tuple[str, dict]], field: str, fixed: dict,
               lang_field: str | None) -> list[dict]:
    out = []
    for place, r in rows:
        if field not in r:
            files.text(label, place, r, field)  # the one line for a row without the field
        messages = _chat(r[field], f"{label}: {place}: {field}")
        if src.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": src.system}, *messages]
        out.append({"prompt": "", "response": "", "messages": messages,
                    "lang": fixed.get("lang") or files.text(label, place, r, lang_field),
                    "task": fixed.get("task") or files.text(label, place, r, "task", optional=True) or None,
                    "source": key.rsplit(".", 1)[-1]})
    return out


def load_source(key: str, src, seed: int, offline: bool) -> list[dict]:
    """Rows {prompt, response, lang, task} of one source, field mapping applied."""
    if src.type == "xtremeup":
        return _xtremeup_rows(key, src)
    label, rows = raw_rows(key, src, seed, offline)
    if not rows:
        raise PolyftError(f"{key}: the source has no rows")
    columns = set(rows[0][1])
    for col, value in src.where.items():
        if col not in columns:
            raise PolyftError(f"{key}.where.{col}: not a column of the source; columns: {', '.join(sorted(columns))}")
        rows = [(place, r) for place, r in rows if str(r.get(col)) == str(value)]
        if not rows:
            raise PolyftError(f"{key}.where.{col}={value} matches no rows")
    chat = messages_column(src, columns)
    if chat is not None and chat not in columns:
        raise PolyftError(f"{key}.messages_field={chat} is not a column of the source; "
                          f"columns: {', '.join(sorted(columns))}")
    for field_key in () if chat else ("prompt_field", "response_field", "input_field"):
        name = getattr(src, field_key)
        if name and name not in columns:
            raise PolyftError(f"{key}.{field_key}={name} is not a column of the source; "
                              f"columns: {', '.join(sorted(columns))}")
    fixed = dict(src.features)
    lang_field = src.lang_field if src.lang_field in columns else None
    if "lang" not in fixed and lang_field is None:
        raise PolyftError(f"{key}: no language; set {key}.features.lang or {key}.lang_field to a column")
    if chat:
        return _chat_rows(key, label, src, rows, chat, fixed, lang_field)
    system = {"system": src.system} if src.system and src.prompt_field else {}
    out = []
    for place, r in rows:
        prompt = files.text(label, place, r, src.prompt_field) if src.prompt_field else ""
        extra = files.text(label, place, r, src.input_field, optional=True) if src.input_field else None
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        out.append({
            "prompt": prompt,
            "response": files.text(label, place, r, src.response_field),
            "lang": fixed.get("lang") or files.text(label, place, r, lang_field),
            "task": fixed.get("task") or files.text(label, place, r, "task", optional=True) or None,
            "source": key.rsplit(".", 1)[-1],
            **system,
        })
    return out
