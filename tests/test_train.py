"""`polyft train` end to end on the tiny models: real TRL/peft/bitsandbytes code paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import polyft

FAST = ["logger=none", "train.max_steps=40", "train.save_steps=40"]


def run_record(run_root: Path) -> dict:
    files = sorted(run_root.rglob("run.json"), key=lambda f: f.stat().st_mtime)
    assert files, f"no run.json under {run_root}"
    return json.loads(files[-1].read_text())


def probe_logits(model, tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("Tom has 3 apples. How many apples?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def adapter_changes_base(adapter_dir: Path) -> None:
    """The adapter loads with plain peft from its recorded base, and changes the output."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    assert Path(base_ref).is_dir(), base_ref
    base = AutoModelForCausalLM.from_pretrained(base_ref)
    before = probe_logits(base, adapter_dir)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    after = probe_logits(tuned, adapter_dir)
    assert (after - before).abs().max() > 1e-3


def loss_falls(record: dict) -> None:
    losses = [h["loss"] for h in record["history"]]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses


def test_default_train_is_lora_on_tiny_model(cli):
    """`polyft train` with no arguments: LoRA on tiny-llama and the demo mixture."""
    proc = cli("train", env={"WANDB_API_KEY": "sekrit-key-123", "HF_TOKEN": "hf_sekrit456"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run_record(cli.cwd / "outputs" / "runs")
    assert record["status"] == "ok" and record["seed"] == 0
    assert record["versions"]["transformers"] and record["versions"]["peft"]
    assert record["config"]["adapter"]["type"] == "lora"
    loss_falls(record)
    adapter = Path(record["artifacts"][0]["path"])
    assert (adapter / "adapter_model.safetensors").exists()
    adapter_changes_base(adapter)
    # wandb ran offline inside the run dir; no secret from the environment was written anywhere
    run_dir = Path(record["run_dir"]) if "run_dir" in record else next((cli.cwd / "outputs" / "runs").rglob("run.json")).parent
    assert (run_dir / "wandb").is_dir()
    for f in list((cli.cwd / "outputs").rglob("*")):
        if f.is_file() and f.stat().st_size < 5_000_000:
            data = f.read_bytes()
            assert b"sekrit" not in data, f


@pytest.mark.parametrize("variant", [["adapter=full"], ["quant=4bit"], ["quant=8bit"], ["model=tiny-mistral"]],
                         ids=lambda v: v[0])
def test_variants_train_and_load(cli, variant):
    out = cli.cwd / "product"
    proc = cli("train", *FAST, f"output_dir={out}", *variant)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run_record(cli.cwd / "outputs" / "runs")
    loss_falls(record)
    assert json.loads((out / "manifest.json").read_text())["kind"] in ("adapter", "model")
    if variant == ["adapter=full"]:
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(out)
        base = AutoModelForCausalLM.from_pretrained(record["extra_base"] if "extra_base" in record
                                                    else json.loads((out / "manifest.json").read_text())["base_model"])
        assert (probe_logits(tuned, out) - probe_logits(base, out)).abs().max() > 1e-3
    else:
        adapter_changes_base(out)


def test_hub_preset_with_local_path(cli, tiny_llama_dir):
    """A 7B preset pointed at a local directory goes through the same loading code."""
    out = cli.cwd / "product"
    proc = cli("train", *FAST, "model=llama-2-7b", f"model.path={tiny_llama_dir}", f"output_dir={out}",
               "adapter.target_modules=[all-linear]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    assert {"gate_proj", "down_proj", "q_proj"} <= set(conf["target_modules"])


def test_sweep_one_artifact_per_point_and_rerun_trains_nothing(cli):
    sweep = cli.cwd / "sweep"
    args = ["train", "-m", "adapter.r=4,8", "quant=none,4bit", f"hydra.sweep.dir={sweep}",
            "logger=none", "train.max_steps=10", "train.save_steps=10"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(4)]
    assert all(r["status"] == "ok" for r in records)
    paths = {r["artifacts"][0]["path"] for r in records}
    assert len(paths) == 4 and not any(r["artifacts"][0]["reused"] for r in records)
    assert {(r["config"]["adapter"]["r"], r["config"]["quant"]["name"]) for r in records} == \
        {(4, "none"), (8, "none"), (4, "4bit"), (8, "4bit")}
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(4)]
    assert all(r["artifacts"][0]["reused"] and not r["history"] for r in again)
    assert {r["artifacts"][0]["path"] for r in again} == paths


def _weights(adapter_dir: Path) -> dict:
    return load_file(adapter_dir / "adapter_model.safetensors")


def test_killed_run_resumes_to_the_same_weights(cli, cache_root):
    """Killed once train.save_total_limit=2 has pruned the first checkpoint: the run resumes
    from the newest one left and ends with the weights of a run never interrupted."""
    args = ["train", "logger=none", "train.max_steps=200", "train.save_steps=25", "adapter.dropout=0.1",
            "train.save_total_limit=2"]
    out = cli.cwd / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "polyft.cli", *args, f"output_dir={out}"], cwd=cli.cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = cli.cwd / "outputs" / "artifacts" / "adapter" / ".work"

    def pruned() -> bool:  # the third checkpoint is complete and the first is gone
        done = list(work.glob("*/checkpoint-75/trainer_state.json"))
        return bool(done) and not (done[0].parent.parent / "checkpoint-25").exists()

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not pruned():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written at output_dir
    left = sorted(p.name for p in work.glob("*/checkpoint-*"))
    assert "checkpoint-25" not in left and "checkpoint-75" in left and len(left) <= 3, left
    done = cli(*args, f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = run_record(cli.cwd / "outputs" / "runs")
    assert record["train"]["resumed_from"].endswith(("checkpoint-75", "checkpoint-100")), record["train"]
    # the same config, uninterrupted, in another output root
    other = cli.cwd / "other"
    (other / "models").parent.mkdir(parents=True, exist_ok=True)
    (other / "models").symlink_to(cache_root / "models", target_is_directory=True)
    ref = cli(*args, f"output_root={other}", f"output_dir={cli.cwd / 'straight'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = _weights(out), _weights(cli.cwd / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_merge_back_writes_bf16_merged_model(cli):
    out = cli.cwd / "product"
    proc = cli("train", *FAST, "quant=4bit", "merge_back=true", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in merged.named_parameters())
    conf = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"], dtype=torch.bfloat16)
    expected = probe_logits(PeftModel.from_pretrained(base, out), out).float()
    got = probe_logits(merged, out).float()
    assert (got - expected).abs().max() < 0.1


def test_tensorboard_logger_writes_into_the_hydra_run_dir(cli):
    """One log dir per product under the run dir; the loss from step 1 and at the last step
    though logging_steps is above max_steps, and run.json's final_loss is that last one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = cli.cwd / "my-run"
    proc = cli("train", "logger=tensorboard", "train.max_steps=3", "train.logging_steps=10", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok"
    assert [h["step"] for h in record["history"]] == [1, 3]
    assert record["metrics"]["final_loss"] == record["history"][-1]["loss"] is not None
    log_dir = run_dir / "tensorboard" / Path(record["train"]["artifact"]).name
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 3]
    assert abs(acc.Scalars("train/loss")[-1].value - record["metrics"]["final_loss"]) < 1e-6


def test_store_build_removes_a_killed_builds_temporary_dir(tmp_path):
    from polyft.runs import ArtifactStore

    store = ArtifactStore(tmp_path)
    final = store.path_for("model", "x", {"a": 1})
    stale = final.parent / f".tmp-{final.name}-dead"
    stale.mkdir(parents=True)
    with store.build("model", "x", {"a": 1}) as b:
        (b.dir / "w.txt").write_text("ok")
    assert not stale.exists() and (final / "w.txt").read_text() == "ok"
    assert store.find("model", "x", {"a": 1}) == final


def test_two_identical_commands_at_once_one_builds_the_other_waits_and_reuses(cli):
    args = ["train", "logger=none", "train.max_steps=60", "train.save_steps=30"]
    procs = [subprocess.Popen([sys.executable, "-m", "polyft.cli", *args], cwd=cli.cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    records = [json.loads(f.read_text()) for f in (cli.cwd / "outputs" / "runs").rglob("run.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    (built,) = [r for r in records if not r["artifacts"][0]["reused"]]
    (reused,) = [r for r in records if r["artifacts"][0]["reused"]]
    assert built["artifacts"][0]["path"] == reused["artifacts"][0]["path"]
    # the second waited for the first: it started before the first had trained
    started = lambda r: time.mktime(time.strptime(r["started"], "%Y-%m-%dT%H:%M:%S"))  # noqa: E731
    assert started(reused) <= started(built) + built["wall_time_s"] - 1, (reused["started"], built["started"])
    assert len(list((cli.cwd / "outputs" / "artifacts" / "adapter").glob("tiny-llama-lora-*"))) == 1
