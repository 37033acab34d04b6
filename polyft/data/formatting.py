"""Chat formatting and tokenisation, with loss on the response only.

Each row becomes `input_ids` plus a `completion_mask` (1 on response tokens); TRL's SFT
trainer turns the mask into labels, truncates and packs. The tokenized mixture is cached
by content hash so every sweep point over the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from polyft.errors import PolyftError
from polyft.runs import config_hash, file_lock

# polyft's named chat template (model.chat_template=plain), for base models that ship none
# (e.g. Llama-2 base): plain turns. Never applied unless asked for.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
CHAT_TEMPLATES = ("model", "plain")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def no_template(source) -> PolyftError:
    return PolyftError(f"model.chat_template=model: {source} ships no chat template; set "
                       "model.chat_template=plain for polyft's plain '### User:' / '### Response:' turns")


def ships_chat_template(path) -> bool | None:
    """Whether the local model directory's tokenizer has a chat template (None: not a local
    directory, e.g. a hub id, known only once the tokenizer is loaded). No transformers."""
    p = Path(path)
    if not (p / "tokenizer_config.json").is_file():
        return None
    if any((p / f).is_file() for f in _TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return None


def check_chat_template(path, choice: str) -> None:
    """Refuse, before anything is written, a template that would have to be invented."""
    if choice == "model" and ships_chat_template(path) is False:
        raise no_template(path)


def use_chat_template(tokenizer, choice: str, source) -> None:
    """Give `tokenizer` the chat template model.chat_template names: its own, or plain."""
    if choice == "plain":
        tokenizer.chat_template = PLAIN_TEMPLATE
    elif not getattr(tokenizer, "chat_template", None):
        raise no_template(source)


# Bumped when `encode` changes what a row becomes: it is part of every product's key
# (polyft.products.train_key), so a product trained on the old encoding is not reused.
ENCODING = 2  # 2: the tokenizer's own leading special tokens (Gemma's <bos>) start each row


def leading_special(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by default (Gemma, Llama: <bos>; SmolLM2:
    none). lm-eval adds them at scoring time, so training rows start with them too."""
    probe = "x"
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k: k + len(bare)] == bare:
            return list(full[:k])
    return []


def encode(row: dict, tokenizer) -> dict:
    lead = leading_special(tokenizer)

    def with_lead(ids: list[int]) -> list[int]:  # once: a chat template may already write <bos>
        return ids if ids[: len(lead)] == lead else lead + ids

    if not row["prompt"]:  # plain text (continued pretraining): every token carries loss
        ids = with_lead(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        return {"input_ids": ids, "completion_mask": [0] * len(lead) + [1] * (len(ids) - len(lead)),
                "lang": row["lang"], "task": row.get("task") or ""}
    user = [{"role": "user", "content": row["prompt"]}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["response"]}],
                                         tokenize=False)
    if not full.startswith(prompt):  # templates that rewrite earlier turns: mask by length only
        prompt = full[: len(prompt)]
    p_ids = with_lead(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = with_lead(tokenizer(full, add_special_tokens=False)["input_ids"])
    if ids[: len(p_ids)] != p_ids:  # a merge across the boundary: encode the halves apart
        ids = p_ids + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "completion_mask": [0] * len(p_ids) + [1] * (len(ids) - len(p_ids)),
            "lang": row["lang"], "task": row.get("task") or ""}


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer")
                       else repr(tokenizer.get_vocab()).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()[:12]


def tokenized_dataset(rows: list[dict], tokenizer, cache_root: str | os.PathLike,
                      chat_template: str = "model", source: str = "the base model"):
    """A datasets.Dataset of encoded rows, loaded from the cache when the content matches.
    Rows with a prompt are rendered with the chat template `chat_template` names."""
    import datasets

    if chat_template == "plain" or any(r["prompt"] for r in rows):
        use_chat_template(tokenizer, chat_template, source)
    key = config_hash({"rows": config_hash(rows, 32), "tokenizer": tokenizer_fingerprint(tokenizer),
                       "encoding": ENCODING})
    target = Path(cache_root) / "cache" / "data" / key
    if not (target / "dataset_info.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.with_suffix(".lock")):
            if not (target / "dataset_info.json").exists():
                ds = datasets.Dataset.from_list([encode(r, tokenizer) for r in rows])
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=target.parent))
                try:
                    ds.save_to_disk(str(tmp))
                    os.rename(tmp, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target)), key
