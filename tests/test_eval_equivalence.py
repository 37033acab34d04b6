"""`polyft eval` on a task YAML of one's own scores what lm-eval itself scores.

The reference is what a researcher runs by hand: lm-eval's Python API with the HF model by
path and every setting at its default (batch size 1, dtype auto, no chat template), only
device=cpu. polyft runs with its defaults (the demo suite's group underneath, batch size 8,
a base model object shared across models). Every metric must agree to 1e-6, each prompt
and generated text exactly, each request's loglikelihood to float32 rounding.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import assert_refused

TASKS = ["equiv_choice", "equiv_answer"]
TOL = 1e-6


def write_tasks(root: Path) -> Path:
    """Two tasks and their data: 4-way multiple choice (acc, acc_norm; 2-shot from the same
    split, so lm-eval's few-shot sampler and seed matter) and a generate_until task."""
    rng = random.Random(0)
    words = ["red", "river", "seven", "apple", "blue", "twelve"]
    choice_rows, answer_rows = [], []
    for _ in range(24):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        # options of different lengths, so acc (sum of logprobs) and acc_norm (per byte) disagree
        options = [str(a + b), str(a + b + rng.randint(1, 5)), f"the number {rng.choice(words)}", rng.choice(words)]
        rng.shuffle(options)
        choice_rows.append({"question": f"What is {a} plus {b}?", "options": options,
                            "label": options.index(str(a + b))})
        answer_rows.append({"question": f"What is {b} plus {a}?", "answer": str(a + b)})
    data = root / "data"
    data.mkdir(parents=True)
    for name, rows in (("choice", choice_rows), ("answer", answer_rows)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "equiv_choice.yaml").write_text(
        f"task: equiv_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / 'choice.jsonl'}\n"
        "test_split: test\nfewshot_split: test\nnum_fewshot: 2\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{options}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "equiv_answer.yaml").write_text(
        f"task: equiv_answer\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / 'answer.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: answer\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n")
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("equiv") / "tasks")


def lm_eval_direct(model_dir: Path, task_dir: Path, limit: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False only skips indexing lm-eval's own ~14k tasks; the tasks are the same
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=TASKS, device="cpu",
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   limit=limit, log_samples=True)


def polyft_eval(cli, task_dir: Path, limit: int, *args: str) -> tuple[dict, Path]:
    proc = cli("eval", f"eval.include_path={task_dir}", f"eval.tasks=[{','.join(TASKS)}]", f"eval.limit={limit}",
               "eval.log_samples=true", *args, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = sorted((cli.cwd / "outputs" / "runs").rglob("run.json"), key=lambda f: f.stat().st_mtime)[-1]
    record = json.loads(run.read_text())
    return record, Path(record["artifacts"][0]["path"])


def assert_same(record: dict, artifact: Path, direct: dict) -> None:
    """Every metric (and stderr) of lm-eval's results in polyft's rows, and the same requests,
    loglikelihoods and generations in the samples."""
    rows = {(r["task"], r["metric"], r["filter"]): r for r in record["metrics"]["results"]}
    expected = {(task, *key.split(",", 1)): value for task, metrics in direct["results"].items()
                for key, value in metrics.items() if "," in key and "_stderr," not in key}
    assert set(rows) == set(expected)
    for key, value in expected.items():
        assert rows[key]["value"] == pytest.approx(value, abs=TOL), key
        stderr = direct["results"][key[0]][f"{key[1]}_stderr,{key[2]}"]
        assert rows[key]["stderr"] == pytest.approx(stderr, abs=TOL), key
    for task in TASKS:
        ours = [json.loads(line) for line in (artifact / "samples" / f"{task}.jsonl").read_text().splitlines()]
        theirs = direct["samples"][task]
        assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in theirs]
        for a, b in zip(ours, theirs):
            assert a["arguments"] == json.loads(json.dumps(b["arguments"])), task  # prompts, few-shot, gen kwargs
            if task == "equiv_choice":
                # batches of 8 against 1: other matmul shapes, float32 rounding (~1e-5 on SmolLM2)
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], rel=1e-5)
            else:
                assert a["filtered_resps"] == b["filtered_resps"]


def test_custom_task_equals_lm_eval_on_tiny_model(cli, task_dir, tiny_llama_dir):
    record, artifact = polyft_eval(cli, task_dir, 8)
    direct = lm_eval_direct(tiny_llama_dir, task_dir, 8)
    assert_same(record, artifact, direct)
    # the task list replaced the demo suite's: no chat template, none recorded
    assert record["eval"]["chat_template"] is None
    assert not any(t["apply_chat_template"] for t in record["eval"]["tasks"])
    acc = {r["metric"]: r["value"] for r in record["metrics"]["results"] if r["task"] == "equiv_choice"}
    assert acc["acc"] != acc["acc_norm"]  # the two scorings are both exercised


@pytest.fixture(scope="module")
def bf16_tiny(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model whose config.json says bfloat16 (weights stored in float32)."""
    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    shutil.copytree(tiny_llama_dir, out)
    conf = json.loads((out / "config.json").read_text())
    conf["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(conf))
    return out


def test_dtype_auto_is_the_checkpoints_as_in_lm_eval(cli, task_dir, bf16_tiny):
    """lm-eval's dtype=auto loads the checkpoint's dtype; so does `polyft eval` (model.dtype=auto)."""
    record, artifact = polyft_eval(cli, task_dir, 4, f"model.path={bf16_tiny}")
    direct = lm_eval_direct(bf16_tiny, task_dir, 4)
    assert_same(record, artifact, direct)


@pytest.fixture(scope="module")
def templateless(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model with its chat template removed, like a base model that ships none."""
    out = tmp_path_factory.mktemp("plain") / "tiny-no-template"
    shutil.copytree(tiny_llama_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    return out


def test_no_chat_template_is_invented(cli, templateless):
    # the demo suite renders prompts as chat turns: a model without a template is refused
    assert_refused(cli, "eval", f"model.path={templateless}", "eval.limit=2",
                   words=["model.chat_template=model", "model.chat_template=plain"])
    assert_refused(cli, "train", f"model.path={templateless}", "train.max_steps=1",
                   words=["model.chat_template=model", "model.chat_template=plain"])
    assert_refused(cli, "eval", "model.chat_template=fancy", words=["model.chat_template=fancy", "model, plain"])


def test_plain_chat_template_is_named_and_recorded(cli, templateless):
    from polyft.data.formatting import PLAIN_TEMPLATE

    proc = cli("eval", f"model.path={templateless}", "model.chat_template=plain", "eval.langs=[en]",
               "eval.limit=2", "eval.log_samples=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(next((cli.cwd / "outputs" / "runs").rglob("run.json")).read_text())
    assert record["config"]["model"]["chat_template"] == "plain"
    assert record["eval"]["chat_template"] == "plain"
    artifact = Path(record["artifacts"][0]["path"])
    assert json.loads((artifact / "manifest.json").read_text())["chat_template"] == "plain"
    sample = json.loads((artifact / "samples" / "demo_arith_en.jsonl").read_text().splitlines()[0])
    assert sample["arguments"][0][0].startswith("### User:\n")
    assert "### Response:" in PLAIN_TEMPLATE


@pytest.mark.slow
def test_custom_task_equals_lm_eval_on_smollm2(cli, task_dir, smollm2_dir):
    """The acceptance line: `polyft eval model=smollm2-135m ...` equals lm_eval on the converted
    directory, same task, same limit."""
    record, artifact = polyft_eval(cli, task_dir, 6, "model=smollm2-135m")
    direct = lm_eval_direct(smollm2_dir, task_dir, 6)
    assert_same(record, artifact, direct)
