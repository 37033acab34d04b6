"""GGUF files as base models, on a tiny Llama written as GGUF here: conversion, the checks
the CLI runs before writing anything, atomicity under a kill, model.path on a tiny preset,
and tied embeddings through every merge method."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused
from polyft.models import gguf as gg


def state(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_conversion_reproduces_the_model_and_its_tokenizer(tiny_gguf, tiny_gguf_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, got = state(tiny_llama_dir), state(tiny_gguf_dir)
    assert "lm_head.weight" not in got  # tied: the embeddings are the output layer
    assert got.keys() == set(src) - {"lm_head.weight"}
    for name, t in src.items():
        if name != "lm_head.weight":
            assert got[name].dtype == torch.float32
            assert torch.equal(got[name], t), name  # float32 GGUF: exact, q/k permutation undone
    conf = json.loads((tiny_gguf_dir / "config.json").read_text())
    assert conf["tie_word_embeddings"] is True and conf["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf_dir)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    a, b = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_gguf_dir)
    text = "Swali: 12 + 7 ni ngapi? 十二たす七"
    assert a(text).input_ids == b(text).input_ids
    msgs = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)
    assert b.eos_token == a.eos_token and b.pad_token == a.pad_token
    assert (tiny_gguf_dir / "generation_config.json").is_file()
    record = json.loads((tiny_gguf_dir / gg.RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert record["source"] == str(tiny_gguf.resolve()) and record["transformers"]
    assert tiny_gguf_dir.name.endswith(record["sha256"][:16])


def test_converted_once_and_keyed_by_content(tiny_gguf, tiny_gguf_dir, cache_root, tmp_path):
    before = (tiny_gguf_dir / "model.safetensors").stat().st_mtime_ns
    assert gg.ensure_converted(tiny_gguf, cache_root) == tiny_gguf_dir
    assert (tiny_gguf_dir / "model.safetensors").stat().st_mtime_ns == before
    copy = tmp_path / "renamed.gguf"  # same bytes elsewhere: same content key
    copy.write_bytes(tiny_gguf.read_bytes())
    assert gg.ensure_converted(copy, cache_root, build=False) == tiny_gguf_dir


# A conversion that waits two minutes once the weights are written (before the tokenizer is
# read), so that it can be killed there: the wait is patched in by the test, not polyft's.
STALLED_CONVERSION = """
import sys, time
from pathlib import Path
import transformers
load = transformers.AutoTokenizer.from_pretrained
def stalled(*args, **kwargs):
    time.sleep(120)
    return load(*args, **kwargs)
transformers.AutoTokenizer.from_pretrained = stalled
from polyft.models.gguf import ensure_converted
ensure_converted(Path(sys.argv[1]), sys.argv[2])
"""


def test_a_killed_conversion_leaves_no_cache(tiny_gguf, tmp_path):
    root = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_CONVERSION, str(tiny_gguf), str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = root / "models"
    try:
        deadline = time.time() + 300
        while not list(models.glob(".tmp-*/model.safetensors")):  # the weights are written
            assert proc.poll() is None and time.time() < deadline, "the conversion ended or hung"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in models.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"] == []
    target = gg.ensure_converted(tiny_gguf, root, build=False)
    assert not target.exists()
    assert gg.ensure_converted(tiny_gguf, root) == target  # the next run converts from scratch
    assert gg.is_converted(target) and not list(models.glob(".tmp-*"))  # the killed one's is gone


@pytest.fixture
def notanarch_gguf(tmp_path) -> Path:
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_input_is_refused_before_anything_is_written(cli, tmp_path, notanarch_gguf):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    assert_refused(cli, "train", f"model.path={not_gguf}", words=["model.path", "not a GGUF file"])
    assert_refused(cli, "eval", f"model.path={not_gguf}", words=["not a GGUF file"])
    assert_refused(cli, "train", f"model.path={notanarch_gguf}", words=["notanarch", "llama"])
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(notanarch_gguf.read_bytes()[:40])
    assert_refused(cli, "train", f"model.path={damaged}", words=["damaged.gguf", "unreadable GGUF header"])
    assert_refused(cli, "train", f"model.path={tmp_path / 'missing.gguf'}",
                   words=["missing.gguf", "no such file"])
    assert_refused(cli, "train", f"model.path={tmp_path}", "+model.gguf_file=missing.gguf",
                   words=["model.gguf_file=missing.gguf"])
    assert not list((cli.cwd / "outputs" / "models").glob(".tmp-*"))
    assert_refused(cli, "train", "model=smollm2-135m", "model.package=polyft-no-such-package",
                   words=["polyft-no-such-package", "make fetch-model", "model.path="])


def test_model_path_on_a_tiny_preset_is_used_or_refused(cli, tiny_mistral_dir, tiny_gguf, tiny_gguf_dir):
    from polyft.cli.compose import compose
    from polyft.products import train_plan

    assert_refused(cli, "train", "model.path=/does/not/exist", words=["model.path=/does/not/exist"])
    assert train_plan(compose("train", [f"model.path={tiny_mistral_dir}"]), build_model=False).model_path == \
        str(tiny_mistral_dir)
    cfg = compose("train", [f"model.path={tiny_gguf}", f"output_root={tiny_gguf_dir.parents[1]}"])
    assert train_plan(cfg).model_path == str(tiny_gguf_dir)


def test_training_a_gguf_model_uses_the_converted_directory(cli, tiny_gguf, tiny_gguf_dir):
    out = cli.cwd / "adapter"
    proc = cli("train", f"model.path={tiny_gguf}", "train.max_steps=1", "train.batch_size=4",
               "data.num_examples=8", "logger=none", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_gguf_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"]["model"]["resolved"] == str(tiny_gguf_dir)


# ------------------------------------------------------------ tied embeddings in merges

@pytest.fixture(scope="module")
def tied(tiny_gguf_dir, tmp_path_factory):
    """(base, [two fine-tune-like variants], LoRA adapter): all with tied embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tied")
    variants = []
    for seed in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(tiny_gguf_dir)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # the tied matrix is one parameter: perturbed once
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model.save_pretrained(root / f"v{seed}")
        variants.append(root / f"v{seed}")
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gguf_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    return tiny_gguf_dir, variants, root / "lora"


METHODS = [("linear", {}), ("task_arithmetic", {"scale": 0.8}), ("ties", {"density": 0.5}),
           ("ties_sv", {"density": 0.5, "slack": 0.1}), ("dare_linear", {"density": 0.5}),
           ("dare_ties", {"density": 0.5}), ("slerp", {"t": 0.3}),
           ("layer_swap", {"bottom": 1, "top": 1, "transition_bottom": 1, "transition_top": 1})]


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_tied_embeddings_survive_every_merge(tied, tmp_path, method, params):
    from transformers import AutoModelForCausalLM

    from polyft.merge.engine import MergeSpec, merge_models

    base, variants, lora = tied
    for models in (variants, [lora, variants[1]]):
        out = tmp_path / f"{method}-{models[0].name}"
        out.mkdir()
        merge_models(MergeSpec(method, models, base, params, dtype="bfloat16",
                               adapter_bases={str(lora): base}), out)
        assert "lm_head.weight" not in state(out)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
        model = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        assert torch.equal(model.model.embed_tokens.weight, state(out)["model.embed_tokens.weight"])
