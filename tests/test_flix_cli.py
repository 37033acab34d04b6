"""FLix through the real CLI on the tiny model: refusals, exp=flix_demo end to end (train ->
eval -> report, then a rerun that reuses everything), flix_compose against polyft eval on
the FLix run, and exp=flix_xtremeup's composition and sweep validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_refused, assert_user_error

DEMO = ["+exp=flix_demo", "model=tiny-llama", "train.max_steps=6", "train.save_steps=6", "eval.limit=4"]


@pytest.mark.parametrize("args,words", [
    (["adapter.features=[task,genre]"], ["adapter.features[1]=genre", "task, lang"]),
    (["adapter.ranks.lang=0"], ["adapter.ranks.lang=0", "integer >= 1"]),
    (["adapter.feature_dropout=1.0"], ["adapter.feature_dropout=1.0", "[0, 1)"]),
    (["adapter.feature_dropout=-0.1"], ["adapter.feature_dropout=-0.1", "[0, 1)"]),
    (["data.packing=true"], ["data.packing", "adapter=flix"]),
])
def test_bad_flix_training_input_is_refused(cli, args, words):
    assert_refused(cli, "train", "adapter=flix", "logger=none", *args, words=words)


def test_a_source_without_a_task_value_is_refused(cli):
    rows = cli.cwd / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "lang": "sw"}) + "\n" for i in range(4)))
    assert_refused(cli, "train", "adapter=flix", "logger=none", "data.sources.math.type=jsonl",
                   f"data.sources.math.path={rows}", "data.sources.math.features.task=''",
                   words=["data.sources.math", "task value", "data.sources.math.features.task=VALUE"])


def run_json(run_root: Path) -> dict:
    files = sorted(run_root.rglob("run.json"), key=lambda f: f.stat().st_mtime)
    return json.loads(files[-1].read_text())


@pytest.mark.slow
def test_flix_demo_end_to_end_compose_and_eval_equality(cli):
    proc = cli("run", *DEMO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("flix / seen", "flix / held_out_pair", "flix / held_out_lang",
                "shared / seen", "shared / held_out_pair", "shared / held_out_lang"):
        assert f"| {row} |" in out, out[-3000:]
    assert "lang=ja was not seen in training" in out  # the held-out language: task LoRA alone
    record = run_json(cli.cwd / "outputs" / "runs" / "run")
    trained = record["trained"]
    assert trained["flix"]["flix_values"] == {"task": ["instruct", "math"], "lang": ["de", "en", "sw"]}
    assert trained["shared"]["matched_rank"]["r"] == 2 * 16 + 3 * 8
    assert trained["flix"]["trainable_params"] == trained["shared"]["trainable_params"] > 0
    flix_dir = next(a["path"] for a in record["artifacts"] if a.get("name") == "flix")

    rerun = cli("run", *DEMO)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = run_json(cli.cwd / "outputs" / "runs" / "run")
    assert again["artifacts"] and all(a["reused"] for a in again["artifacts"] if a.get("role") != "report")
    assert "| flix / held_out_pair |" in rerun.stdout

    # the held-out pair composed to one PEFT LoRA, scored as a plain adapter, equals polyft eval on FLix
    merged = cli.cwd / "composed"
    proc = cli("merge", "merge=flix_compose", f"merge.adapter={flix_dir}", "merge.features.task=math",
               "merge.features.lang=sw", f"output_dir={merged}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = json.loads((merged / "adapter_config.json").read_text())
    assert conf["r"] == conf["lora_alpha"] == 24 and conf["peft_type"] == "LORA"
    tasks = "eval.tasks=[{name:demo_arith_sw,lang:sw,task:math,num_fewshot:0}]"
    plain = cli("eval", "model=tiny-llama", f"eval.model={merged}", tasks, "eval.limit=4", "logger=none")
    assert plain.returncode == 0, plain.stderr[-3000:]
    flix_rows = [r for r in run_json(cli.cwd / "outputs" / "runs" / "run")["metrics"]["results"]
                 if r["model"] == "flix" and r["task"] == "demo_arith_sw"]
    plain_rows = run_json(cli.cwd / "outputs" / "runs" / "eval")["metrics"]["results"]
    key = lambda r: (r["metric"], r["filter"])  # noqa: E731
    assert {key(r): r["value"] for r in plain_rows} == {key(r): r["value"] for r in flix_rows} != {}

    # composing: an unseen language falls back to the task alone, an unknown task is refused
    ja = cli("merge", "merge=flix_compose", f"merge.adapter={flix_dir}", "merge.features.task=instruct",
             "merge.features.lang=ja", f"output_dir={cli.cwd / 'ja'}")
    assert ja.returncode == 0 and "notice: lang=ja was not seen in training" in ja.stdout, ja.stderr[-2000:]
    assert json.loads((cli.cwd / "ja" / "adapter_config.json").read_text())["r"] == 16
    bad = cli("merge", "merge=flix_compose", f"merge.adapter={flix_dir}", "merge.features.task=poetry",
              "merge.features.lang=en", f"output_dir={cli.cwd / 'poetry'}")
    assert_user_error(bad, "merge.features.task=poetry", "never trained", "instruct, math")
    assert not (cli.cwd / "poetry").exists()


def test_flix_compose_refuses_a_non_flix_directory(cli, tiny_llama_dir):
    assert_refused(cli, "merge", "merge=flix_compose", f"merge.adapter={tiny_llama_dir}", "merge.features.task=math",
                   words=["merge.adapter=", "not a FLix adapter directory", "flix_config.json"])


SP_LANGS = ["en", "de", "es", "fr", "fi", "hu", "hi", "ja", "pt_br", "ru", "th", "tr"]  # the exp's training languages


def fake_release(root: Path) -> Path:
    files = [("semantic_parsing", "train", lang, {"input": "a", "target": "b"}) for lang in SP_LANGS]
    files += [("qa_in_lang", "train", "sw", {"question": "q", "title": "t", "context": "c", "target": "c"}),
              ("translation", "train", "sw", {"input": "hi", "target": "jambo"})]
    for task, split, lang, row in files:
        f = root / task / split / f"{lang}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(row) + "\n")
    return root


def test_flix_xtremeup_composes_and_its_sweep_is_validated_before_running(cli):
    root = fake_release(cli.cwd / "xtreme_up")
    proc = cli("train", "+exp=flix_xtremeup", f"eval.xtremeup_root={root}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "type: flix" in proc.stdout and "name: mistral-7b" in proc.stdout and "match: flix" in proc.stdout
    # a bad point anywhere in the sweep is refused before any point runs or any file is read
    for bad in (["adapter.ranks.task=8,0", "adapter.feature_dropout=0.1"],
                ["adapter.ranks.task=8,16", "adapter.feature_dropout=0.1,0.3,1.0"]):
        proc = cli("train", "+exp=flix_xtremeup", f"eval.xtremeup_root={root}", "-m", *bad)
        assert_user_error(proc, "adapter.")
        assert not (cli.cwd / "multirun").exists() and not (cli.cwd / "outputs" / "runs").exists()


def test_a_matched_lora_trained_alone_is_the_product_its_experiment_uses():
    """`polyft train +exp=... expert=shared` sizes the LoRA to its FLix expert as `polyft run`
    does (it used to skip the match and fail on FLix's per-type alpha)."""
    from polyft.cli.compose import compose
    from polyft.products import expert_config, train_plan

    alone = compose("train", ["+exp=flix_demo", "model=tiny-llama", "expert=shared"])
    whole = compose("run", ["+exp=flix_demo", "model=tiny-llama"])
    a, w = expert_config(alone, "shared"), expert_config(whole, "shared")
    assert a.adapter.type == "lora" and isinstance(a.adapter.r, int) and a.adapter.r == w.adapter.r
    assert train_plan(a, build_model=False).key == train_plan(w, build_model=False).key
