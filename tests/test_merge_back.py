"""merge_back=true: the LoRA folded into the base by the streaming merge engine equals
peft's merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(base_dir: Path, out: Path, **lora) -> Path:
    """A peft adapter with random non-zero B (as trained), saved as train saves a product."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def _peft_merged(base_dir: Path, adapter: Path, dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict().items()}


def _merge_back(adapter: Path, base_dir: Path) -> dict:
    from safetensors.torch import load_file

    from polyft.training import merge_back

    cfg = OmegaConf.create({"model": {"revision": None, "dtype": "auto", "trust_remote_code": False},
                            "allow_pickle": False})
    out = merge_back(adapter, str(base_dir), cfg)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("lora", [
    {"r": 8, "lora_alpha": 16, "target_modules": LINEARS},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True,
     "alpha_pattern": {"v_proj": 32}},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"], "use_dora": True},
], ids=["lora_all_linear", "rslora_alpha_pattern", "dora"])
def test_streaming_merge_back_equals_merge_and_unload(tmp_path, tiny_llama_dir, lora):
    adapter = _adapter(tiny_llama_dir, tmp_path / "product", **lora)
    got = _merge_back(adapter, tiny_llama_dir)
    # peft's merge in fp32 (the base as stored), then the bf16 merge_back writes
    expected = {k: v.to(torch.bfloat16) for k, v in _peft_merged(tiny_llama_dir, adapter, torch.float32).items()}
    assert set(got) == set(expected)
    assert all(got[k].dtype == torch.bfloat16 for k in got)
    diff = max((got[k].float() - expected[k].float()).abs().max().item() for k in got)
    assert diff == 0.0, diff
    # the adapter changed the weights it targets, and the merged directory loads on its own
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = {k: v.to(torch.bfloat16) for k, v in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict().items()}
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert changed and all(any(t in k for t in lora["target_modules"]) for k in changed)
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged")
    assert merged.dtype == torch.bfloat16
    AutoTokenizer.from_pretrained(adapter / "merged")


def test_adapter_the_engine_cannot_fold_goes_through_peft(tmp_path, tiny_llama_dir):
    """A LoRA on the embeddings (lora_embedding_A/B) is merged by peft, in bf16 as before."""
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tiny_llama_dir, tmp_path / "product", r=4, lora_alpha=8,
                       target_modules=["embed_tokens", "q_proj"])
    got = _merge_back(adapter, tiny_llama_dir)
    expected = _peft_merged(tiny_llama_dir, adapter, torch.bfloat16)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).state_dict()
    assert not torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
