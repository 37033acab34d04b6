"""merge=lorahub: the product is sum w_i A_i, sum w_i B_i of the inputs, found by a
deterministic search; bad input is refused; exp=transfer_demo runs the three strategies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_refused
from test_run import rows_of, table_of

ARGS = ["merge=lorahub", "merge.budget=6", "logger=none"]


def _lora(base: Path, out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA made by plain peft (not polyft), with random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                     init_lora_weights=False)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir, tiny_mistral_dir):
    """Three LoRAs and odd ones (other rank, targets, base; an IA3 adapter), few-shot files."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from polyft.data.synthetic import generate

    root = tmp_path_factory.mktemp("lorahub")
    out = {f"a{i}": _lora(tiny_llama_dir, root / f"a{i}", seed=i) for i in range(3)}
    out["rank8"] = _lora(tiny_llama_dir, root / "rank8", seed=3, r=8)
    out["targets"] = _lora(tiny_llama_dir, root / "targets", seed=4, targets=("q_proj", "k_proj"))
    out["mistral"] = _lora(tiny_mistral_dir, root / "mistral", seed=5)
    torch.manual_seed(6)
    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                         IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(root / "ia3"))
    out["ia3"] = root / "ia3"
    rows = generate("arithmetic", ["sw"], 10, seed=7)
    out["shots"] = root / "shots.jsonl"
    out["shots"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["renamed"] = root / "renamed.jsonl"
    out["renamed"].write_text("".join(json.dumps({"q": r["prompt"], "a": r["response"]}) + "\n" for r in rows))
    out["empty"] = root / "empty.jsonl"
    out["empty"].write_text("\n")
    out["base"] = tiny_llama_dir
    return out


def adapters_arg(inputs, *names) -> str:
    return "merge.adapters=[" + ",".join(str(inputs[n]) for n in names) + "]"


def test_product_is_the_weighted_sum_and_loads_with_plain_peft(cli, inputs):
    """The product's factors are sum w_i A_i, sum w_i B_i of the inputs (written out here);
    fidelity to the authors' objective and search is tests/test_lorahub_reference.py's."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = cli.cwd / "composed"
    # random LoRAs only hurt, so w = 0 would win; bounds away from 0 make every w_i count
    proc = cli("merge", *ARGS, adapters_arg(inputs, "a0", "a1", "a2"), f"merge.data={inputs['shots']}",
               "merge.bounds=[0.2,1.0]", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    w = manifest["weights"]
    assert len(w) == 3 and all(0.2 <= x <= 1.0 for x in w)
    traj = manifest["trajectory"]
    assert len(traj) == 6
    for t in traj:
        assert t["objective"] == pytest.approx(t["loss"] + 0.05 * sum(abs(x) for x in t["weights"]) / 3)
    assert manifest["best_objective"] == pytest.approx(manifest["best_loss"] + 0.05 * sum(abs(x) for x in w) / 3)

    product = load_file(str(out / "adapter_model.safetensors"))
    srcs = [load_file(str(inputs[f"a{i}"] / "adapter_model.safetensors")) for i in range(3)]
    assert set(product) == set(srcs[0]) and any(".lora_A." in n for n in product)
    for name, tensor in product.items():
        expected = sum(wi * s[name] for wi, s in zip(w, srcs))  # A* = sum w_i A_i, B* = sum w_i B_i
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)

    # plain peft loads it
    base = AutoModelForCausalLM.from_pretrained(str(inputs["base"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert model.peft_config["default"].r == 4

    record = json.loads(next((cli.cwd / "outputs" / "runs" / "merge").rglob("run.json")).read_text())
    assert record["metrics"]["lorahub_weights"] == w
    assert record["metrics"]["lorahub_loss_trajectory"] == [t["loss"] for t in traj]


def test_same_seed_same_bits_and_renamed_fields(cli, inputs):
    args = [*ARGS, adapters_arg(inputs, "a0", "a1", "a2"), "merge.optimizer=CMA", "merge.seed=3"]
    products = []
    for i, data in enumerate(["shots", "renamed"]):  # the same rows, under other field names
        extra = ["merge.prompt_field=q", "merge.response_field=a"] if data == "renamed" else []
        out = cli.cwd / f"p{i}"
        # a fresh output_root each time: nothing is reused, every product is searched anew
        proc = cli("merge", *args, *extra, f"merge.data={inputs[data]}", f"output_dir={out}",
                   f"output_root={cli.cwd / f'root{i}'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        products.append(((out / "adapter_model.safetensors").read_bytes(),
                         json.loads((out / "manifest.json").read_text())))
    assert products[0][0] == products[1][0]
    assert products[0][1]["trajectory"] == products[1][1]["trajectory"]
    assert len({tuple(t["weights"]) for t in products[0][1]["trajectory"]}) > 1  # CMA explored


def test_rerun_reuses_the_product(cli, inputs):
    args = [*ARGS, adapters_arg(inputs, "a0", "a1"), f"merge.data={inputs['shots']}", "merge.budget=2"]
    assert cli("merge", *args).returncode == 0
    again = cli("merge", *args)
    assert again.returncode == 0 and "already built" in again.stdout, again.stdout[-2000:]


BAD = {
    "one_adapter": (["a0"], [], ["merge.adapters", "two or more"]),
    "different_bases": (["a0", "mistral"], [], ["merge.adapters[1]", "base"]),
    "different_targets": (["a0", "targets"], [], ["merge.adapters[1]", "target modules"]),
    "different_ranks": (["a0", "rank8"], [], ["merge.adapters[1]", "r=8", "rank"]),
    "not_lora": (["a0", "ia3"], [], ["merge.adapters[1]", "IA3", "LoRA"]),
    "not_an_adapter": (["a0", "base"], [], ["merge.adapters[1]", "adapter_config.json"]),
    "empty_shots": (["a0", "a1"], ["merge.data=EMPTY"], ["merge.data", "no rows"]),
    "missing_shots": (["a0", "a1"], ["merge.data=/nonexistent/shots.jsonl"], ["merge.data", "no such file"]),
    "missing_fields": (["a0", "a1"], ["merge.data=RENAMED"], ["merge.data", "prompt", "merge.prompt_field"]),
    "no_data": (["a0", "a1"], ["merge.data=null"], ["merge.data is missing"]),
    "zero_budget": (["a0", "a1"], ["merge.budget=0"], ["merge.budget=0", ">= 1"]),
    "negative_budget": (["a0", "a1"], ["merge.budget=-3"], ["merge.budget=-3"]),
    "bounds_reversed": (["a0", "a1"], ["merge.bounds=[1.5,-1.5]"], ["merge.bounds", "low < high"]),
    "bounds_equal": (["a0", "a1"], ["merge.bounds=[0.5,0.5]"], ["merge.bounds", "low < high"]),
    "unknown_optimizer": (["a0", "a1"], ["merge.optimizer=Gradient"], ["merge.optimizer=Gradient", "CMA"]),
    "unknown_objective": (["a0", "a1"], ["merge.objective=nll"], ["merge.objective=nll", "authors", "token_mean"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused(cli, inputs, case):
    names, extra, words = BAD[case]
    extra = [e.replace("EMPTY", str(inputs["empty"])).replace("RENAMED", str(inputs["renamed"])) for e in extra]
    if not any(e.startswith("merge.data=") for e in extra):
        extra.append(f"merge.data={inputs['shots']}")
    assert_refused(cli, "merge", *ARGS, adapters_arg(inputs, *names), *extra, words=words)


# The study on the tiny model, small budgets: mechanics, not numbers (the README has those).
DEMO = ["+exp=transfer_demo", "model=tiny-llama", "train.max_steps=8", "merge.budget=4", "eval.limit=6",
        "eval.models=[base,cont,full_fewshot,lorahub]"]


@pytest.mark.slow
def test_transfer_demo_prints_three_strategies_then_reuses_every_stage(cli):
    first = cli("run", *DEMO)
    assert first.returncode == 0, first.stderr[-4000:]
    table = table_of(first.stdout)
    rows = rows_of(table, "demo_arith")
    assert set(rows) == {"base", "cont", "full_fewshot", "lorahub"}, table
    assert all(cells[0] != "—" for cells in rows.values()), table
    runs = cli.cwd / "outputs" / "runs" / "run"
    record = json.loads(next(runs.rglob("run.json")).read_text())
    made = {a.get("name") or Path(a["path"]).name.split("-")[0] for a in record["artifacts"] if not a["reused"]}
    assert {"en", "fr", "es", "cont", "full_fewshot"} <= made, made
    merged = [a for a in record["artifacts"] if a["role"] == "merged"]
    manifest = json.loads((Path(merged[0]["path"]) / "manifest.json").read_text())
    assert manifest["refs"] == ["en", "fr", "es"] and len(manifest["weights"]) == 3

    again = cli("run", *DEMO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert table_of(again.stdout) == table
    record = json.loads(sorted(runs.rglob("run.json"))[-1].read_text())
    assert record["artifacts"] and all(a["reused"] for a in record["artifacts"]), record["artifacts"]
