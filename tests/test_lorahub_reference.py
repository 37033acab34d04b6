"""merge=lorahub against the LoraHub authors' own code (PyPI `lorahub` 0.1.0).

Their `lorahub_learning` loads a seq2seq model, so the test drives their algorithm module
one level down, as lorahub_learning itself does: their state-dict cache (built with peft's
get_peft_model_state_dict), their get_score / default_get_loss / default_l1_regularization,
their seed, parametrisation, NGOpt and minimize loop, and their get_final_weights. The shots
are tokenised once (polyft's training format) and given to both as the same token ids.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import pytest

lorahub = pytest.importorskip("lorahub.algorithm")  # installed by `make test` (no deps)


def _lora(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # small factors: the weights then move the loss without swamping it
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    from polyft.data.synthetic import generate

    root = tmp_path_factory.mktemp("lorahub-ref")
    adapters = [_lora(tiny_llama_dir, root / f"a{i}", seed=10 + i) for i in range(3)]
    shots = root / "shots.jsonl"
    shots.write_text("".join(json.dumps(r) + "\n" for r in generate("arithmetic", ["sw"], 6, seed=3)))
    return {"base": tiny_llama_dir, "adapters": adapters, "shots": shots, "root": root}


def authors_dataset(setup):
    """The shots as the authors' DataLoader wants them: equal-length rows of input_ids,
    attention_mask, labels (-100 outside the response), plus their `input` column."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from polyft.data.formatting import PLAIN_TEMPLATE, encode

    tok = AutoTokenizer.from_pretrained(str(setup["base"]))
    tok.chat_template = PLAIN_TEMPLATE
    rows = [json.loads(line) for line in setup["shots"].read_text().splitlines()]
    enc = [encode({"lang": "", **r}, tok) for r in rows]
    width = max(len(e["input_ids"]) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = {"input": [r["prompt"] for r in rows], "input_ids": [], "attention_mask": [], "labels": []}
    for e in enc:
        n = len(e["input_ids"])
        data["input_ids"].append(e["input_ids"] + [pad] * (width - n))
        data["attention_mask"].append([1] * n + [0] * (width - n))
        data["labels"].append([t if keep else -100 for t, keep in zip(e["input_ids"], e["completion_mask"])]
                              + [-100] * (width - n))
    return Dataset.from_dict(data)


def authors_search(setup, budget: int, batch_size):
    """lorahub_learning's body for a causal LM: returns (asked weights, recommendation, final
    state dict, the score function)."""
    import numpy
    import nevergrad as ng
    import torch
    from peft import PeftModel
    from peft.utils.save_and_load import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    def fresh_base():
        return AutoModelForCausalLM.from_pretrained(str(setup["base"]), dtype=torch.float32)

    names = [str(a) for a in setup["adapters"]]
    random.seed(42)
    numpy.random.seed(42)
    model = PeftModel.from_pretrained(fresh_base(), names[0]).eval()
    cache = {n: get_peft_model_state_dict(PeftModel.from_pretrained(fresh_base(), n)) for n in names}
    dataset = authors_dataset(setup)
    score = partial(lorahub.get_score, model=model, cache=cache, example_dataset=dataset, batch_size=batch_size,
                    get_loss=lorahub.default_get_loss, get_regular=lorahub.default_l1_regularization)
    asked = []

    def recorded(weights):
        asked.append([float(x) for x in weights])
        return score(weights)

    instrum = ng.p.Array(init=[0] * len(names), upper=[1.5] * len(names), lower=[-1.5] * len(names))
    optimizer = ng.optimizers.NGOpt(parametrization=instrum, budget=budget)
    recommendation = optimizer.minimize(recorded)
    final = lorahub.get_final_weights(recommendation.value, names, cache)
    return asked, [float(x) for x in recommendation.value], final, score


@pytest.mark.parametrize("batch_size", [None, 4])
def test_polyft_runs_the_authors_procedure(cli, setup, batch_size):
    import torch
    from safetensors.torch import load_file

    budget = 12
    out = cli.cwd / "composed"
    adapters = "merge.adapters=[" + ",".join(str(a) for a in setup["adapters"]) + "]"
    proc = cli("merge", "merge=lorahub", adapters, f"merge.data={setup['shots']}", f"merge.budget={budget}",
               f"merge.batch_size={'null' if batch_size is None else batch_size}", "model.chat_template=plain",
               "logger=none", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())

    asked, picked, final, score = authors_search(setup, budget, batch_size)
    # the same search path, candidate by candidate, and the same answer
    assert [t["weights"] for t in manifest["trajectory"]] == asked
    assert manifest["weights"] == picked
    assert len({tuple(w) for w in asked}) > 1
    # the same objective value at the same weights (their get_score: loss + 0.05 mean|w|)
    for t in manifest["trajectory"]:
        assert t["objective"] == pytest.approx(score(t["weights"]), rel=1e-6, abs=1e-7)
    # the same composed tensors, bit for bit in fp32 (their keys carry the peft prefix)
    product = load_file(str(out / "adapter_model.safetensors"))
    assert len(product) == len(final)
    for key, tensor in final.items():
        saved = product[key]
        assert saved.dtype == torch.float32 and torch.equal(saved, tensor), key


def test_token_mean_objective_is_a_named_option(cli, setup):
    """objective=token_mean: the mean CE over response tokens, written out here from the logits
    of a plain peft model; it differs from the authors' value at the same weights."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = cli.cwd / "tm"
    adapters = "merge.adapters=[" + ",".join(str(a) for a in setup["adapters"]) + "]"
    proc = cli("merge", "merge=lorahub", adapters, f"merge.data={setup['shots']}", "merge.budget=3",
               "merge.objective=token_mean", "model.chat_template=plain", "logger=none", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["objective"] == "token_mean"
    dataset = authors_dataset(setup)
    ids = torch.tensor(dataset["input_ids"])
    attn = torch.tensor(dataset["attention_mask"])
    labels = torch.tensor(dataset["labels"])
    base = AutoModelForCausalLM.from_pretrained(str(setup["base"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()  # the product: the chosen weights
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = labels[:, 1:]
    token_mean = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    assert manifest["best_loss"] == pytest.approx(float(token_mean), rel=1e-5)
    authors = float(model(input_ids=ids, attention_mask=attn, labels=labels).loss) / len(ids)
    assert abs(authors - manifest["best_loss"]) > 1e-3
