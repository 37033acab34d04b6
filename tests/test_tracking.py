"""W&B and TensorBoard as `logger=` writes them: one tracked run per trained product, grouped,
with polyft's config, the loss from step 1, and eval results beside them. Read back with
the trackers' own readers (`wandb leet inspect --json` on the offline .wandb files,
TensorBoard's EventAccumulator), never through polyft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Two LoRA experts and no merge: math logs every 2 of 4 steps; lang asks for every 10 of 3.
TWO_EXPERTS = """# @package _global_
exp_name: two_experts
experts:
  math: {data: demo_math, train: {max_steps: 4, logging_steps: 2, save_steps: 100}}
  lang: {data: demo_lang, train: {max_steps: 3, logging_steps: 10, save_steps: 100}}
eval:
  limit: 2
  langs: [en]
"""
WANDB = Path(sys.executable).parent / "wandb"


def two_experts(cwd: Path) -> None:
    (cwd / "conf" / "exp").mkdir(parents=True)
    (cwd / "conf" / "exp" / "two_experts.yaml").write_text(TWO_EXPERTS)


def record_of(root: Path) -> tuple[Path, dict]:
    f = sorted(root.rglob("run.json"))[-1]
    return f.parent, json.loads(f.read_text())


def wandb_runs(run_dir: Path) -> dict[str, dict]:
    """Each offline run under run_dir/wandb, by display name, as wandb's own reader gives it."""
    runs = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(f)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        run = {"config": {}, "losses": [], "dir": f.parent, "exit": None}
        for line in out.stdout.splitlines():
            rec = json.loads(line)
            if rec["type"] == "run":
                r = rec["run"]
                run.update(name=r["display_name"], group=r.get("run_group"), job_type=r.get("job_type"))
                run["config"].update(r["config"]["update"])
            elif rec["type"] == "config":
                run["config"].update(rec["config"]["update"])
            elif rec["type"] == "history" and "train/loss" in rec["history"]["item"]:
                item = rec["history"]["item"]
                run["losses"].append((item["train/global_step"], item["train/loss"]))
            elif rec["type"] == "exit":
                run["exit"] = rec["exit"].get("exit_code", 0)
        runs[run["name"]] = run
    return runs


def test_experiment_with_two_experts_leaves_two_offline_runs_and_its_eval_in_their_group(cli):
    two_experts(cli.cwd)
    proc = cli("run", "+exp=two_experts")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, record = record_of(cli.cwd / "outputs" / "runs" / "run")
    trained = record["trained"]
    products = {a["name"]: Path(a["path"]) for a in record["artifacts"] if a["role"] == "adapter"}
    runs = wandb_runs(run_dir)
    assert len(runs) == 3, sorted(runs)
    for expert, steps in (("math", [1, 2, 4]), ("lang", [1, 3])):
        run = runs[products[expert].name]  # named after its product's directory
        assert run["group"] == "two_experts" and run["job_type"] == "train" and run["exit"] == 0
        # its own loss curve, from step 1 (logging_steps never above max_steps), as the trainer logged it
        history = [(h["step"], h["loss"]) for h in trained[expert]["history"]]
        assert [s for s, _ in run["losses"]] == steps, run["losses"]
        assert run["losses"] == history
        polyft = run["config"]["polyft"]
        assert polyft["expert"] == expert and polyft["exp_name"] == "two_experts"
        assert polyft["data"]["name"] == f"demo_{expert}" and polyft["train"]["max_steps"] == steps[-1]
        assert run["config"]["product"]["hash"] == json.loads((products[expert] / "manifest.json").read_text())["hash"]
        assert run["config"]["learning_rate"] == polyft["train"]["lr"]  # the trainer's arguments beside polyft's
    evals = [r for r in runs.values() if r["job_type"] == "eval"]
    assert len(evals) == 1 and evals[0]["group"] == "two_experts" and evals[0]["exit"] == 0
    assert {k: v["product"] for k, v in evals[0]["config"]["scored"].items() if k != "base"} == \
        {e: products[e].name for e in ("math", "lang")}
    table = json.loads(next((evals[0]["dir"] / "files" / "media" / "table").rglob("*.table.json")).read_text())
    got = sorted(tuple(row[:6]) for row in table["data"])
    want = sorted((r["model"], r["task"], r["lang"], r["metric"], r["filter"], r["value"])
                  for r in record["metrics"]["results"])
    assert got == want and {g[0] for g in got} == {"base", "math", "lang"}
    assert table["columns"][:6] == ["model", "task", "lang", "metric", "filter", "value"]
    # the console says where the runs are and how to upload them
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in proc.stdout, proc.stdout
    assert [t["name"] for t in record["tracking"]] == [products["math"].name, products["lang"].name,
                                                       evals[0]["name"]]
    # the summary names each expert's own adapter and no merge (the experiment has none)
    assert "expert math: model tiny-llama, adapter lora r=8" in proc.stdout
    assert "  merge" not in proc.stdout

    again = cli("run", "+exp=two_experts")  # everything reused: no new tracked run
    assert again.returncode == 0, again.stderr[-3000:]
    rerun_dir, rerun = record_of(cli.cwd / "outputs" / "runs" / "run")
    assert rerun_dir != run_dir and "tracking" not in rerun and not (rerun_dir / "wandb").exists()


def test_sweep_points_in_one_process_each_get_their_own_run_in_the_sweeps_group(cli):
    sweep = cli.cwd / "sweep"
    proc = cli("train", "-m", "train.max_steps=1,2", "train.logging_steps=5", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = []
    for point, steps in ((0, [1]), (1, [1, 2])):
        runs = wandb_runs(sweep / str(point))
        assert len(runs) == 1, runs
        (name, run), = runs.items()
        record = json.loads((sweep / str(point) / "run.json").read_text())
        assert name == Path(record["train"]["artifact"]).name
        assert [s for s, _ in run["losses"]] == steps and run["exit"] == 0
        assert record["metrics"]["final_loss"] == run["losses"][-1][1]
        assert run["config"]["polyft"]["train"]["max_steps"] == steps[-1]
        seen.append(run["group"])
    assert seen[0] == seen[1] == f"train sweep {sweep.parent.name}/{sweep.name}"
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in proc.stdout
    assert "[#0] polyft: training adapter" in proc.stdout and "[#1] polyft: training adapter" in proc.stdout


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_one_log_dir_per_expert(cli):
    two_experts(cli.cwd)
    proc = cli("train", "+exp=two_experts", "logger=tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, record = record_of(cli.cwd / "outputs" / "runs" / "train")
    products = {a["name"]: Path(a["path"]).name for a in record["artifacts"]}
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == sorted(products.values())
    for expert in ("math", "lang"):
        history = [(h["step"], h["loss"]) for h in record["trained"][expert]["history"]]
        got = scalars(run_dir / "tensorboard" / products[expert], "train/loss")
        assert [s for s, _ in got] == [s for s, _ in history]
        assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got, history))  # float32 in the event file
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in proc.stdout
