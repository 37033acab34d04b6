"""Chat rows (`messages` with system prompts) as a data source, and a validation set: the
labels TRL trains on are the assistant turns only, checked against hand-built token lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import assert_refused, hf_model_dir

CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Kenya?"},
        {"role": "assistant", "content": "Nairobi"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def source(**kw):
    from polyft.config.schema import SourceConfig

    return OmegaConf.merge(OmegaConf.structured(SourceConfig), kw)


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the text pieces written out by hand, and the labels TRL should train on:
    the ids of the pieces marked True (assistant turns), -100 elsewhere."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def trl_labels(encoded: dict, model_dir: Path, tmp_path: Path) -> list[int]:
    """The labels TRL's SFTTrainer makes of an encoded row (its own dataset preparation, as
    polyft.training configures it: completion_only_loss)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), completion_only_loss=True, use_cpu=True, bf16=False,
                     report_to=[], max_length=512, dataset_num_proc=None)
    data = Dataset.from_list([{"input_ids": encoded["input_ids"], "completion_mask": encoded["completion_mask"]}])
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    return list(trainer.train_dataset[0]["labels"])


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_chat_row_trains_on_assistant_turns_only(tmp_path, tokenizer, tiny_llama_dir):
    """Two turns and a system prompt, through the tiny model's own chat template."""
    from polyft.data.formatting import encode
    from polyft.data.sources import load_source

    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT, "lang": "en"}])
    rows = load_source("data.sources.chat", source(type="jsonl", path=str(f)), 0, True)
    assert rows[0]["messages"] == CHAT and rows[0]["lang"] == "en"
    enc = encode(rows[0], tokenizer)
    ids, labels = expected(tokenizer, [
        ("<|system|>\nAnswer in one word.\n<|user|>\nCapital of France?\n<|assistant|>\n", False),
        ("Paris<|eos|>\n", True),
        ("<|user|>\nAnd of Kenya?\n<|assistant|>\n", False),
        ("Nairobi<|eos|>\n", True)])
    assert enc["input_ids"] == ids
    assert trl_labels(enc, tiny_llama_dir, tmp_path) == labels


def test_plain_template_and_a_source_system_prompt(tmp_path, tokenizer, tiny_llama_dir):
    """A tokenizer without a chat template under model.chat_template=auto gets polyft's plain
    turns; a source's `system` reaches prompt/response rows and chats without one."""
    from polyft.data.formatting import encode, use_chat_template
    from polyft.data.sources import load_source

    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    use_chat_template(plain, "auto", "test")
    f = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "2+2?", "response": "4", "lang": "en"}])
    row = load_source("data.sources.qa", source(type="jsonl", path=str(f), system="Be brief."), 0, True)[0]
    enc = encode(row, plain)
    ids, labels = expected(plain, [("### System:\nBe brief.\n### User:\n2+2?\n### Response:\n", False),
                                   ("4<|eos|>\n", True)])
    assert (enc["input_ids"], trl_labels(enc, tiny_llama_dir, tmp_path)) == (ids, labels)

    g = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[1:3], "lang": "sw"}])
    row = load_source("data.sources.c", source(type="jsonl", path=str(g), system="Be brief."), 0, True)[0]
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}
    enc = encode(row, plain)
    ids, labels = expected(plain, [("### System:\nBe brief.\n### User:\nCapital of France?\n### Response:\n", False),
                                   ("Paris<|eos|>\n", True)])
    assert (enc["input_ids"], trl_labels(enc, tiny_llama_dir, tmp_path)) == (ids, labels)


def test_prompt_response_rows_encode_as_a_one_turn_chat(tmp_path, tokenizer):
    from polyft.data.formatting import encode

    as_row = encode({"prompt": "Capital of France?", "response": "Paris", "lang": "en"}, tokenizer)
    as_chat = encode({"prompt": "", "response": "", "messages": CHAT[1:3], "lang": "en"}, tokenizer)
    assert as_row == as_chat


@pytest.mark.parametrize("rows,words", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "lang": "en"}],
     ["data.sources.chat: ", "chat.jsonl: line 1: messages[1]", "role=tool", "system, user, assistant"]),
    ([{"messages": [{"role": "user", "content": "hi"}], "lang": "en"}],
     ["data.sources.chat: ", "chat.jsonl: line 1: messages", "no assistant turn"]),
    ([{"messages": "not a chat", "lang": "en"}], ["data.sources.chat: ", "chat.jsonl: line 1: messages", "not JSON"]),
])
def test_bad_chat_rows_are_one_line(cli, rows, words):
    f = write_jsonl(cli.cwd / "chat.jsonl", rows)
    assert_refused(cli, "train", f"data.sources.chat={{type: jsonl, path: {f}}}", words=words)


def test_validation_ratio_outside_its_range_is_refused(cli):
    assert_refused(cli, "train", "data.validation_ratio=1.0", words=["data.validation_ratio=1.0", "[0, 1)"])
    assert_refused(cli, "train", "train.eval_steps=5", words=["train.eval_steps=5", "validation"])


def test_held_out_rows_are_never_trained_on():
    """data.validation_ratio holds out that share of each source's distinct rows, duplicates
    included: not one validation row is in the training mixture."""
    from polyft.config.schema import DataConfig
    from polyft.data.mixture import load_splits
    from polyft.data.sources import load_source

    data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(
        Path(__file__).resolve().parents[1] / "polyft" / "conf" / "data" / "demo.yaml"), {"validation_ratio": 0.1})
    key = lambda r: (r["prompt"], r["response"], r["lang"])  # noqa: E731
    distinct = {name: {key(r) for r in load_source(name, src, data.seed, True)} for name, src in data.sources.items()}
    train, held = load_splits(data, True)
    for name, rows in distinct.items():
        assert len({key(r) for r in held if r["source"] == name}) == round(len(rows) * 0.1)
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len(train) == 2 * 800 - len(held)


def test_a_chat_jsonl_trains_with_a_validation_source(cli, tiny_llama_dir):
    """The acceptance line: a model of our making without a chat template (model=hf: polyft's
    plain turns), a chat jsonl from the user's own data option and a held-out validation file.
    The rows the trainer got are the hand-built ones."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from polyft.data.formatting import PLAIN_TEMPLATE

    mine = hf_model_dir(cli.cwd / "base-no-template", tiny_llama_dir, chat_template=False)
    chats = [{"messages": CHAT, "lang": "en"}] * 6 + [{"messages": CHAT[1:3], "lang": "en"}] * 6
    write_jsonl(cli.cwd / "train.jsonl", chats)
    write_jsonl(cli.cwd / "held.jsonl", [{"messages": CHAT[1:3], "lang": "en"}] * 3)
    (cli.cwd / "conf" / "data").mkdir(parents=True)
    (cli.cwd / "conf" / "data" / "mychat.yaml").write_text(
        "name: mychat\nsources:\n"
        f"  chat: {{type: jsonl, path: {cli.cwd / 'train.jsonl'}}}\n"
        f"  held: {{type: jsonl, path: {cli.cwd / 'held.jsonl'}, validation: true}}\n"
        "max_length: 96\n")
    proc = cli("train", "model=hf", f"model.path={mine}", "data=mychat", "logger=none", "train.max_steps=2",
               "train.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = re.search(r"^polyft: records in (\S+):", proc.stdout + proc.stderr, re.M).group(1)
    record = json.loads((cli.cwd / run_dir / "run.json").read_text())
    train = record["train"]
    assert (train["examples"], train["validation_examples"]) == (12, 3)
    assert [e["step"] for e in train["eval_history"]] == [2]  # once, after the last step
    product = cli.cwd / train["artifact"]
    assert product.name.startswith("base-no-template-lora-r8-mychat-")
    saved = AutoTokenizer.from_pretrained(product)
    assert saved.chat_template == PLAIN_TEMPLATE  # evaluation renders prompts as training did

    rows = load_from_disk(str(cli.cwd / "outputs" / "cache" / "data" / train["data_key"]))
    tok = AutoTokenizer.from_pretrained(mine)
    ids, labels = expected(tok, [
        ("### System:\nAnswer in one word.\n### User:\nCapital of France?\n### Response:\n", False),
        ("Paris<|eos|>\n", True),
        ("### User:\nAnd of Kenya?\n### Response:\n", False),
        ("Nairobi<|eos|>\n", True)])
    two_turns = next(r for r in rows if len(r["input_ids"]) == len(ids))
    assert two_turns["input_ids"] == ids
    assert trl_labels(two_turns, mine, cli.cwd) == labels
