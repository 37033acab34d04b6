"""Chat formatting and tokenisation, with loss on the assistant turns only.

Each row becomes `input_ids` plus a `completion_mask` (1 on assistant tokens); TRL's SFT
trainer turns the mask into labels, truncates and packs. A prompt/response row is the chat
[system?, user, assistant]; a `messages` row is its own chat, of any number of turns. The
tokenized mixture is cached by content hash so every sweep point over the same data reuses it.
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
CHAT_TEMPLATES = ("model", "plain", "auto")
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
    """Refuse, before anything is written, a template that would have to be invented
    (model.chat_template=auto never refuses: it falls back to plain)."""
    if choice == "model" and ships_chat_template(path) is False:
        raise no_template(path)


def use_chat_template(tokenizer, choice: str, source) -> None:
    """Give `tokenizer` the chat template model.chat_template names: its own, plain, or
    (auto) its own if it has one, else plain."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if choice == "plain" or (choice == "auto" and not has_own):
        tokenizer.chat_template = PLAIN_TEMPLATE
    elif not has_own:
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


def is_chat(row: dict) -> bool:
    """Rendered through the chat template (a prompt or a conversation), not plain text."""
    return bool(row.get("messages") or row["prompt"])


def chat_of(row: dict) -> list[dict]:
    """The conversation a row stands for: its messages, or [system?, user, assistant]."""
    if row.get("messages"):
        return list(row["messages"])
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character span of each assistant turn (its text and the end
    of turn the template writes after it, e.g. <|eos|>: the model learns to stop). A turn spans
    from the end of the chat before it with the generation prompt to the end of the chat
    through it; a template that rewrites earlier turns (e.g. moves the system prompt) breaks
    that prefix rule, and the turn is then found by its content."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], gen=True) if i else "", render(messages[: i + 1])
        if full.startswith(before) and full.startswith(upto) and len(before) >= cursor and len(upto) > len(before):
            start, end = len(before), len(upto)
        else:
            start = full.find(m["content"], cursor)
            if start < 0:
                raise PolyftError("the chat template does not reproduce an assistant turn verbatim, so its "
                                  "tokens cannot be found for the loss; set model.chat_template=plain")
            end = start + len(m["content"])
            tail = upto[upto.rfind(m["content"]) + len(m["content"]):]  # the template's end of turn
            if tail and full.startswith(tail, end):
                end += len(tail)
        spans.append((start, end))
        cursor = end
    return full, spans


def _tokenize_spans(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask: 1 inside `spans`). The whole text is tokenized once when every span edge
    falls on a token boundary (each prefix's tokens are a prefix of the text's); where a merge
    crosses an edge, the pieces between edges are tokenized apart."""
    def tok(t):
        return tokenizer(t, add_special_tokens=False)["input_ids"]

    edges = sorted({e for span in spans for e in span} - {0, len(text)})
    ids = tok(text)
    at = {}
    for e in edges:
        head = tok(text[:e])
        if ids[: len(head)] != head:
            break
        at[e] = len(head)
    else:
        at.update({0: 0, len(text): len(ids)})
        mask = [0] * len(ids)
        for s, e in spans:
            mask[at[s]:at[e]] = [1] * (at[e] - at[s])
        return ids, mask
    ids, mask, bounds = [], [], [0, *edges, len(text)]
    for a, b in zip(bounds, bounds[1:]):
        piece = tok(text[a:b])
        ids += piece
        mask += [int(any(s <= a and b <= e for s, e in spans))] * len(piece)
    return ids, mask


def encode(row: dict, tokenizer) -> dict:
    lead = leading_special(tokenizer)

    def with_lead(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        """Once, outside the loss: a chat template may already write <bos> itself."""
        return (ids, mask) if ids[: len(lead)] == lead else (lead + ids, [0] * len(lead) + mask)

    if not is_chat(row):  # plain text (continued pretraining): every token carries loss
        ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, mask = with_lead(ids, [1] * len(ids))
    else:
        ids, mask = with_lead(*_tokenize_spans(*assistant_spans(chat_of(row), tokenizer), tokenizer))
    return {"input_ids": ids, "completion_mask": mask, "lang": row["lang"], "task": row.get("task") or ""}


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

    if chat_template == "plain" or any(is_chat(r) for r in rows):
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
