"""Products: any model by its path (model=hf), readable names, `polyft ls`, output_dir from
the store, the model card, base references relative inside the output tree."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_refused, hf_model_dir, polyft

FAST = ["logger=none", "train.max_steps=2", "train.save_steps=2"]


def run_json(proc, cwd: Path) -> dict:
    run_dir = re.search(r"^polyft: records in (\S+):", proc.stdout + proc.stderr, re.M).group(1)
    return json.loads((cwd / run_dir / "run.json").read_text())


def train_config(cwd: Path, *args: str):
    """The composed train config of `args`, as the CLI composes it in `cwd`."""
    from polyft.cli.compose import compose

    here = os.getcwd()
    os.chdir(cwd)
    try:
        return compose("train", list(args))
    finally:
        os.chdir(here)


def test_product_names_say_model_adapter_rank_quant_and_data(cli):
    """r=4 and r=8 were both tiny-llama-lora-<hash>; the readable part is no part of the key."""
    from polyft.products import train_plan
    from polyft.runs import config_hash

    def name_and_hash(*args):
        p = train_plan(train_config(cli.cwd, *args), build_model=False)
        return p.name, config_hash(p.key)

    assert name_and_hash("adapter.r=4")[0] == "tiny-llama-lora-r4-demo"
    assert name_and_hash("adapter.r=8", "quant=4bit")[0] == "tiny-llama-lora-r8-4bit-demo"
    assert name_and_hash("adapter=full", "data=demo_math")[0] == "tiny-llama-full-demo_math"
    assert name_and_hash("adapter=lora", "adapter.dora=true")[0] == "tiny-llama-dora-r8-demo"
    assert name_and_hash("model=tiny-mistral", "adapter=flix", "adapter.ranks={task: 4, lang: 2}")[0] == \
        "tiny-mistral-flix-task4-lang2-demo"
    default, named = name_and_hash(), name_and_hash("name=my-first")
    assert named[0] == "my-first" and named[1] == default[1]  # a name never changes what is trained
    assert name_and_hash("adapter.r=4")[1] != default[1]


def test_name_that_is_no_directory_name_is_refused(cli):
    assert_refused(cli, "train", "name=a/b", words=["name=a/b", "letters"])


def test_model_hf_needs_a_path_and_a_hub_id_offline_is_one_line(cli):
    assert_refused(cli, "train", "model=hf", words=["model=hf", "model.path"])
    assert_refused(cli, "train", "model=hf", "model.path=Qwen/Qwen2.5-0.5B", "offline=true",
                   words=["model.path=Qwen/Qwen2.5-0.5B", "offline"])
    # online (here the tests' HF_HUB_OFFLINE=1 answers for the hub): refused before anything is written
    assert_refused(cli, "train", "model=hf", "model.path=no-such-org/no-such-model", "offline=false",
                   words=["model.path=no-such-org/no-such-model", "config.json cannot be read"])


def test_a_hub_id_under_the_tiny_preset_points_to_model_hf(cli):
    assert_refused(cli, "train", "model.path=Qwen/Qwen2.5-0.5B", "offline=false",
                   words=["model=hf model.path=Qwen/Qwen2.5-0.5B"])


def test_layer_swap_depth_of_a_model_hf_comes_from_its_config_json(cli, tiny_llama_dir):
    """No preset says how deep the directory's model is: its config.json does, before any
    expert trains."""
    mine = hf_model_dir(cli.cwd / "l3", tiny_llama_dir, layers=3)
    assert_refused(cli, "run", "+exp=demo", "model=hf", f"model.path={mine}", "merge.bottom=2", "merge.top=2",
                   words=["= 4 layers", "l3 has 3"])


def test_model_hf_reads_its_architecture_from_config_json(cli, tiny_llama_dir):
    """plan counts the LoRA of the directory's own shapes (3 layers, hidden 48, 2 of 4 heads
    for k/v), which no preset holds."""
    mine = hf_model_dir(cli.cwd / "my-llama", tiny_llama_dir, layers=3)
    proc = cli("plan", "model=hf", f"model.path={mine}", "adapter.r=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    h, kv, r, layers = 48, 48 // 4 * 2, 8, 3
    lora = layers * r * ((h + h) + (h + kv) + (h + kv) + (h + h))  # q, k, v, o: r x (in + out) each
    row = next(line for line in proc.stdout.splitlines() if "| my-llama |" in line)
    assert f"| {lora / 1000:.1f}K |" in row, (lora, row)


def test_model_hf_trains_names_lists_copies_and_loads_from_anywhere(cli, tiny_llama_dir, tmp_path_factory):
    """The acceptance line: a local HF directory of our making trains under model=hf, the
    product is named after it, its base reference is relative (both in outputs/), its card
    states the command and config; `polyft ls` lists it; output_dir= copies it from the store
    without training; another working directory merges it."""
    mine = hf_model_dir(cli.cwd / "outputs" / "bases" / "my-llama", tiny_llama_dir)
    args = ["train", "model=hf", f"model.path={mine}", *FAST, "data.validation_ratio=0.05", "train.eval_steps=1"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run_json(proc, cli.cwd)
    product = Path(record["artifacts"][0]["path"])
    assert re.fullmatch(r"my-llama-lora-r8-demo-[0-9a-f]{12}", product.name), product.name
    assert product.parent == cli.cwd / "outputs" / "artifacts" / "adapter"

    # a validation split: 5% of each demo source's distinct rows held out (their count is
    # checked in test_chat_data.py), evaluated every step
    train = record["train"]
    assert 0 < train["validation_examples"] < 0.1 * 2 * 800
    assert train["examples"] + train["validation_examples"] == 2 * 800
    assert [e["step"] for e in train["eval_history"]] == [1, 2]
    assert record["metrics"]["eval_loss"] == train["eval_history"][-1]["eval_loss"] > 0

    conf = json.loads((product / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == os.path.relpath(mine, product) == "../../../bases/my-llama"

    card = (product / "README.md").read_text()
    assert "Model Card for Model ID" not in card  # not PEFT's template
    assert f"polyft train model=hf model.path={mine} logger=none train.max_steps=2" in card
    assert "r: 8" in card and "validation_ratio: 0.05" in card and "name: my-llama" in card

    ls = cli("ls")
    assert ls.returncode == 0, ls.stderr
    line = next(x for x in ls.stdout.splitlines() if product.name in x)
    assert re.search(r"my-llama\s+lora r=8 a=16\s+none\s+demo\s+2\s+\d\.\d{3} \(val\)", line), line
    assert "1 product(s)" in ls.stdout
    assert cli("ls", "r=4").stdout == ""  # a filter that keeps nothing

    # output_dir= of the same settings: a copy of the stored product, nothing trained
    out = tmp_path_factory.mktemp("elsewhere") / "copy"
    proc = cli(*args, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    copied = run_json(proc, cli.cwd)
    artifact = copied["artifacts"][0]
    assert artifact["path"] == str(out) and artifact["reused"] and artifact["copied_from"] == str(product)
    assert "training adapter" not in proc.stdout + proc.stderr and not copied["history"]
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(product / "adapter_model.safetensors").keys()
    assert (out / "adapter_model.safetensors").read_bytes() == (product / "adapter_model.safetensors").read_bytes()
    # outside the output tree its base is named absolutely, so the copy loads as it is
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(mine)

    # another working directory: polyft merges the stored adapter into its base (the relative
    # reference resolved from the adapter's directory, not from there)
    away = tmp_path_factory.mktemp("away")
    merged = away / "merged"
    proc = polyft("merge", "merge=linear", f"merge.models=[{product},{mine}]", f"output_dir={merged}", cwd=away)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mine), product).merge_and_unload()
    expect = {k: (v + load_file(mine / "model.safetensors")[k]) / 2 for k, v in folded.state_dict().items()
              if k in load_file(mine / "model.safetensors")}
    got = load_file(merged / "model.safetensors")
    assert max(float((got[k] - v).abs().max()) for k, v in expect.items()) < 1e-5


def test_stored_product_found_under_another_name(tmp_path):
    """The name is a label: a product stored under another name (an older naming, a name=)
    is found by its hash, and output_dir copies it whole, never half."""
    from polyft.runs import ArtifactStore, config_hash

    store = ArtifactStore(tmp_path / "artifacts")
    key = {"model": "m", "r": 8}
    with store.build("adapter", "old-name", key) as b:
        (b.dir / "weights.bin").write_bytes(b"\x01" * 10)
    found = store.find("adapter", "new-name", key)
    assert found == tmp_path / "artifacts" / "adapter" / f"old-name-{config_hash(key)}"
    assert store.find("adapter", "new-name", {"model": "m", "r": 4}) is None
    got = store.obtain("adapter", "new-name", key, make=lambda b: pytest.fail("trained again"),
                       target=tmp_path / "out")
    assert got.reused and got.copied_from == found and (tmp_path / "out" / "weights.bin").read_bytes() == b"\x01" * 10
    assert not list(tmp_path.glob(".tmp-*"))


def test_relative_base_reference_only_inside_the_output_tree(tmp_path):
    from polyft.runs import base_reference, resolve_base

    root = tmp_path / "outputs"
    base, adapter = root / "models" / "b", root / "artifacts" / "adapter" / "x"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    assert base_reference(adapter, str(base), root) == "../../../models/b"
    assert resolve_base(adapter, "../../../models/b") == str(base.resolve())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert base_reference(outside, str(base), root) == str(base)  # the adapter is outside
    assert base_reference(adapter, str(outside), root) == str(outside)  # the base is outside
    assert base_reference(adapter, "Qwen/Qwen2.5-0.5B", root) == "Qwen/Qwen2.5-0.5B"
    assert resolve_base(adapter, "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize("path,name", [("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"), ("/data/models/my llama/", "my-llama"),
                                       ("/x/SmolLM2-135M.Q4_1.gguf", "SmolLM2-135M.Q4_1"),
                                       ("/hf/hub/models--meta-llama--Llama-3.1-8B/snapshots/abc123", "Llama-3.1-8B")])
def test_model_hf_is_named_after_its_path(cli, path, name):
    cfg = train_config(cli.cwd, "model=hf", f"model.path={path}")
    assert cfg.model.name == name


def test_card_command_line_is_the_one_the_user_typed(tmp_path):
    """A source given whole on the command line is three overrides in the run's record
    (polyft.cli.compose.source_overrides); the card shows it as it was typed, without the
    keys polyft adds (command, config_dirs)."""
    from polyft.cli.compose import source_overrides, with_dirs
    from polyft.models.card import command_line, overrides_of

    typed = ["data.sources.chat={type: jsonl, path: /x/c.jsonl}", "+exp=demo", "expert=math", "adapter.r=4"]
    (tmp_path / ".hydra").mkdir()
    recorded = ["command=train", *source_overrides(with_dirs(typed, [tmp_path]))]
    assert len(recorded) == 1 + 3 + 3 + 1  # what Hydra saves: the expansion and config_dirs
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in recorded))
    assert overrides_of(tmp_path) == typed
    assert command_line("train", typed) == ("polyft train 'data.sources.chat={type: jsonl, path: /x/c.jsonl}' "
                                            "+exp=demo expert=math adapter.r=4")
