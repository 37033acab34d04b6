"""Offline tiny models: a random Llama/Mistral and a byte-level BPE tokenizer trained here.

The result is an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer.json, chat template), so every later `from_pretrained` call is the real one.
Built once per spec and cached; the build is atomic (temporary directory, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from polyft.data.synthetic import corpus
from polyft.runs import file_lock

ARCHS = ("llama", "mistral")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Turns end with <|eos|>, so a prompt rendered with add_generation_prompt is a prefix of the
# full conversation: loss-on-response masking relies on that.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|eos|>\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class TinySpec:
    arch: str = "llama"  # one of ARCHS
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 512
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(spec: TinySpec, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = (MistralConfig(sliding_window=None, **common) if spec.arch == "mistral"
              else LlamaConfig(**common))
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def ensure_tiny_model(name: str, spec: TinySpec, cache_root: str | os.PathLike) -> Path:
    """Return the directory of the tiny model `name`, building it on first use."""

    target = Path(cache_root) / "models" / f"{name}-{spec.digest()}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        tokenizer = train_tokenizer(spec.vocab_size, spec.seed)
        model = build_model(spec, tokenizer)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "polyft_tiny.json").write_text(json.dumps(asdict(spec), indent=2))
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
