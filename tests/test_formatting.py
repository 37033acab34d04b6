"""Training rows start as the tokenizer (and so lm-eval, which scores with it) starts text:
with its leading special tokens, once, outside the loss."""

from __future__ import annotations

import pytest


@pytest.fixture
def tokenizers(tiny_llama_dir):
    """The tiny model's tokenizer (adds nothing before text) and the same with a <bos> post-
    processor, as Gemma's and Llama's add one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from polyft.data.formatting import PLAIN_TEMPLATE

    plain = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    bos = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos.bos_token} $A", special_tokens=[(bos.bos_token, bos.bos_token_id)])
    for t in (plain, bos):
        t.chat_template = PLAIN_TEMPLATE
    return plain, bos


ROW = {"prompt": "Juma ana vitabu 3. Juma anapata 4 zaidi.", "response": "7", "lang": "sw", "task": "math"}


def test_rows_start_with_the_tokenizers_own_bos_once_and_outside_the_loss(tokenizers):
    from polyft.data.formatting import encode

    plain, bos = tokenizers
    assert bos("x")["input_ids"][0] == bos.bos_token_id and plain("x")["input_ids"][0] != plain.bos_token_id
    a, b = encode(ROW, plain), encode(ROW, bos)
    assert b["input_ids"] == [bos.bos_token_id] + a["input_ids"]
    assert b["completion_mask"] == [0] + a["completion_mask"]
    # the prompt the model is trained on is the prompt lm-eval sends: the rendered text as the
    # tokenizer encodes it by default (special tokens added), then the response
    prompt = bos.apply_chat_template([{"role": "user", "content": ROW["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
    n_prompt = b["completion_mask"].index(1)
    assert b["input_ids"][:n_prompt] == bos(prompt)["input_ids"]
    # a template that writes <bos> itself does not get a second one
    bos.chat_template = "{{ bos_token }}" + bos.chat_template
    c = encode(ROW, bos)
    assert c["input_ids"].count(bos.bos_token_id) == 1 and c["input_ids"][0] == bos.bos_token_id
    # plain text (continued pretraining): <bos>, then every token in the loss
    t = encode({"prompt": "", "response": "saba nane tisa", "lang": "sw"}, bos)
    assert t["input_ids"][0] == bos.bos_token_id and t["completion_mask"] == [0] + [1] * (len(t["input_ids"]) - 1)


def test_the_encoding_is_part_of_every_product_key():
    """A product trained before the encoding changed is not reused as if it were new."""
    from polyft.cli.compose import compose
    from polyft.data import formatting
    from polyft.products import train_key

    cfg = compose("train", [])
    assert train_key(cfg, "x")["encoding"] == formatting.ENCODING
