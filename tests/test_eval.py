"""`polyft eval` end to end on the tiny model: real lm-eval, peft and datasets code paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

LIMIT = "eval.limit=6"


def run_records(root: Path) -> list[dict]:
    files = sorted(root.rglob("run.json"), key=lambda f: f.stat().st_mtime)
    assert files, f"no run.json under {root}"
    return [json.loads(f.read_text()) for f in files]


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA with random (non-zero) B matrices: it changes the model like a trained one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_llama_dir, root / "lora_a", 1), make_adapter(tiny_llama_dir, root / "lora_b", 2)


def direct_lm_eval(base: Path, adapter: Path | None, task_dir: Path, tasks: list[str], limit: int,
                   chat: bool, gen_kwargs: dict | None = None) -> dict:
    """What a researcher writes by hand: lm-eval's HF model by path, the same task YAMLs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(base), "dtype": "float32"}
    if adapter is not None:
        model_args["peft"] = str(adapter)
    return lm_eval.simple_evaluate(
        model="hf", model_args=model_args, device="cpu", batch_size=8, tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), limit=limit,
        apply_chat_template=chat, gen_kwargs=gen_kwargs)


def rows_of(record: dict, model: str) -> dict:
    return {(r["task"], r["metric"], r["filter"]): r for r in record["metrics"]["results"] if r["model"] == model}


def test_demo_equals_direct_lm_eval_and_adapter_differs_from_base(cli, adapters, tiny_llama_dir):
    lora_a = adapters[0]
    proc = cli("eval", f"eval.models=[base,{lora_a}]", LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run_records(cli.cwd / "outputs" / "runs")[-1]
    assert record["status"] == "ok"
    # the records say which model is which
    kinds = {m["ref"]: (m["kind"], m["base"]) for m in record["eval"]["models"]}
    assert kinds == {"base": ("model", None), str(lora_a): ("adapter", str(tiny_llama_dir.resolve()))}
    arts = {a["model"]: Path(a["path"]) for a in record["artifacts"]}
    assert set(arts) == {"base", str(lora_a)} and not any(a["reused"] for a in record["artifacts"])
    for ref, art in arts.items():
        stored = [json.loads(line) for line in (art / "results.jsonl").read_text().splitlines()]
        assert stored == [r for r in record["metrics"]["results"] if r["model"] == ref]
        assert json.loads((art / "manifest.json").read_text())["kind"] == "eval"
        assert "results" in json.loads((art / "results.json").read_text())
    base_rows, tuned_rows = rows_of(record, "base"), rows_of(record, str(lora_a))
    assert set(base_rows) == set(tuned_rows) and len(base_rows) == 16
    assert {r["lang"] for r in tuned_rows.values()} == {"en", "de", "sw", "ja"}
    assert all(r["n"] == 6 for r in tuned_rows.values())
    assert any(base_rows[k]["value"] != tuned_rows[k]["value"] for k in base_rows)

    # the same numbers from lm-eval called directly on the task YAMLs the run used
    tasks = sorted({k[0] for k in tuned_rows})
    direct = direct_lm_eval(tiny_llama_dir, lora_a, arts[str(lora_a)] / "tasks", tasks, 6, chat=True,
                            gen_kwargs={"max_gen_toks": 8})
    for (task, metric, filt), row in tuned_rows.items():
        assert direct["results"][task][f"{metric},{filt}"] == row["value"], (task, metric, filt)
        assert direct["results"][task][f"{metric}_stderr,{filt}"] == row["stderr"]


def test_multirun_and_models_list_reuse_each_others_artifacts(cli, adapters):
    lora_a, lora_b = adapters
    sweep = cli.cwd / "sweep"
    proc = cli("eval", "-m", f"eval.model={lora_a},{lora_b}", "eval.limit=3", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    swept = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(2)]
    assert [r["artifacts"][0]["model"] for r in swept] == [str(lora_a), str(lora_b)]
    assert not any(r["artifacts"][0]["reused"] for r in swept)
    # two adapters on one base score differently
    a, b = rows_of(swept[0], str(lora_a)), rows_of(swept[1], str(lora_b))
    assert any(a[k]["value"] != b[k]["value"] for k in a)

    proc = cli("eval", f"eval.models=[{lora_a},{lora_b}]", "eval.limit=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = run_records(cli.cwd / "outputs" / "runs")[-1]
    assert [x["reused"] for x in both["artifacts"]] == [True, True]
    assert {x["path"] for x in both["artifacts"]} == {r["artifacts"][0]["path"] for r in swept}
    assert rows_of(both, str(lora_a)) == a and rows_of(both, str(lora_b)) == b


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


MGSM_SW = [
    {"question": "Juma ana machungwa 5 na anapata 3 zaidi. Ana machungwa mangapi?", "answer": None,
     "answer_number": 8, "equation_solution": "5+3=8"},
    {"question": "Amina ana vitabu 9 na anatoa 4. Vimebaki vitabu vingapi?", "answer": None,
     "answer_number": 5, "equation_solution": "9-4=5"},
    {"question": "Baraka ana kalamu 2 na kalamu 2 zaidi. Ana kalamu ngapi?", "answer": None,
     "answer_number": 4, "equation_solution": "2+2=4"},
]
MGSM_SW_TRAIN = [
    {"question": "Swali: Juma ana machungwa 1 na anapata 1 zaidi. Ana machungwa mangapi?",
     "answer": "Jibu la Hatua kwa Hatua: 1 + 1 = 2. Jibu ni 2.", "answer_number": 2, "equation_solution": "1+1=2"},
]
XNLI_SW = [
    {"premise": "Mtoto analala kitandani.", "hypothesis": "Mtoto amepumzika.", "label": 0},
    {"premise": "Mvua inanyesha sana leo.", "hypothesis": "Leo hakuna mvua.", "label": 2},
    {"premise": "Amina anasoma kitabu.", "hypothesis": "Amina ni mwalimu.", "label": 1},
]


@pytest.mark.parametrize("suite,fewshot,expected", [
    ("mgsm", 1, {"mgsm_direct_sw", "mgsm_native_cot_sw"}),
    ("xnli", 0, {"xnli_sw"}),
])
def test_hub_suites_run_offline_from_local_copies(cli, suite, fewshot, expected):
    data = cli.cwd / "local-data"
    write_jsonl(data / "juletxara__mgsm" / "sw" / "test.jsonl", MGSM_SW)
    write_jsonl(data / "juletxara__mgsm" / "sw" / "train.jsonl", MGSM_SW_TRAIN)
    write_jsonl(data / "facebook__xnli" / "sw" / "validation.jsonl", XNLI_SW)
    short = ["eval.gen_kwargs.max_gen_toks=6"] if suite == "mgsm" else []  # xnli generates nothing
    proc = cli("eval", f"eval={suite}", "eval.langs=[sw]", f"eval.data_dir={data}", "eval.limit=2",
               f"eval.num_fewshot={fewshot}", "eval.batch_size=4", *short,
               env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run_records(cli.cwd / "outputs" / "runs")[-1]
    rows = record["metrics"]["results"]
    assert {r["task"] for r in rows} == expected
    assert all(r["lang"] == "sw" and r["n"] == 2 and r["model"] == "base" for r in rows)
    art = Path(record["artifacts"][0]["path"])
    for task in expected:  # the task YAML that ran reads the local files and nothing else
        conf = (art / "tasks" / f"{task}.yaml").read_text()
        assert str(data / ("juletxara__mgsm" if suite == "mgsm" else "facebook__xnli")) in conf
        assert "dataset_path: json" in conf
    if suite == "mgsm":  # the one-shot exemplar came from the local train split
        assert "training_split" not in (art / "tasks" / "mgsm_direct_sw.yaml").read_text()


def test_custom_include_path_tasks_run_as_lm_eval_runs_them(cli, tiny_llama_dir):
    tasks = cli.cwd / "my_tasks"
    write_jsonl(tasks / "data" / "test.jsonl", [
        {"q": "Andika namba 3 kwa maneno.", "choices": ["tatu", "tano", "moja"], "gold": 0},
        {"q": "Andika namba 5 kwa maneno.", "choices": ["mbili", "tano", "sita"], "gold": 1},
        {"q": "Andika namba 1 kwa maneno.", "choices": ["saba", "nane", "moja"], "gold": 2},
    ])
    (tasks / "utils.py").write_text("def doc_to_text(doc):\n    return 'Swali: ' + doc['q'] + '\\nJibu:'\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'data' / 'test.jsonl'}\n"
              "test_split: test\noutput_type: multiple_choice\ndoc_to_text: !function utils.doc_to_text\n"
              "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    (tasks / "numbers_sw.yaml").write_text("task: numbers_sw\n" + common)
    (tasks / "numbers_plain.yaml").write_text("task: numbers_plain\nmetadata:\n  lang: swa\n" + common)
    (tasks / "numbers_nolang.yaml").write_text("task: numbers\n" + common)
    proc = cli("eval", f"eval.include_path={tasks}", "eval.tasks=[numbers_sw,numbers_plain,numbers]",
               "eval.suite=mine", "eval.apply_chat_template=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run_records(cli.cwd / "outputs" / "runs")[-1]
    rows = {r["task"]: r for r in record["metrics"]["results"]}
    assert {t: r["lang"] for t, r in rows.items()} == {"numbers_sw": "sw", "numbers_plain": "swa", "numbers": None}
    assert all(r["n"] == 3 and r["metric"] == "acc" and r["filter"] == "none" for r in rows.values())
    direct = direct_lm_eval(tiny_llama_dir, None, tasks, sorted(rows), None, chat=False)
    for task, row in rows.items():
        assert direct["results"][task]["acc,none"] == row["value"]


def test_adapters_share_one_base_in_process(adapters, tiny_llama_dir):
    """HFModels loads the base once, swaps adapters on it, and unloading restores it exactly."""
    import torch
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from polyft.eval.models import HFModels, describe, release

    release()
    base_cfg = OmegaConf.create({"dtype": "auto", "revision": None, "trust_remote_code": False})
    models = HFModels(base_cfg, None, device="cpu", batch_size=4)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    refs = [describe(str(p), str(p)) for p in adapters]
    base_ref = describe("base", str(tiny_llama_dir))
    outputs, bases = [], []
    for ref in [refs[0], refs[1], base_ref]:
        lm = models.lm(ref)
        with torch.no_grad():
            outputs.append(lm.model(ids).logits)
        bases.append(id(lm.model.get_base_model() if ref.kind == "adapter" else lm.model))
    assert len(set(bases)) == 1  # one model object throughout
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        assert torch.allclose(outputs[2], fresh(ids).logits, atol=1e-6)  # plain base after unload
        for adapter, out in zip(adapters, outputs[:2]):
            reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter)
            assert torch.allclose(out, reference(ids).logits, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1])
    release()
