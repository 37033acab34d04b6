"""`polyft eval` refusals (exit 2, one line, nothing written) and its light library parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error


def _not_a_model(cwd: Path) -> str:
    d = cwd / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("not weights")
    return str(d)


def _partial_copy(cwd: Path) -> str:
    """Local copies lacking a split: XNLI-sw without validation, MGSM-sw without train."""
    (cwd / "data" / "facebook__xnli" / "sw").mkdir(parents=True)
    (cwd / "data" / "facebook__xnli" / "sw" / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n')
    (cwd / "data" / "juletxara__mgsm" / "sw").mkdir(parents=True)
    (cwd / "data" / "juletxara__mgsm" / "sw" / "test.jsonl").write_text(
        '{"question": "q", "answer": null, "answer_number": 1, "equation_solution": "1"}\n')
    return str(cwd / "data")


def _task_dir(cwd: Path, output_type: str) -> str:
    """A task of one's own (include_path) with the given output_type."""
    d = cwd / "tasks"
    d.mkdir()
    (d / "qa.jsonl").write_text('{"q": "2 + 2?", "a": "4"}\n')
    (d / "my_qa.yaml").write_text(
        f"task: my_qa\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {d / 'qa.jsonl'}}}}}\n"
        f"test_split: test\noutput_type: {output_type}\ndoc_to_text: '{{{{q}}}}'\ndoc_to_target: '{{{{a}}}}'\n"
        "metric_list: [{metric: exact_match}]\n")
    return str(d)


def _latin1_copy(cwd: Path) -> str:
    (cwd / "data" / "facebook__xnli" / "sw").mkdir(parents=True)
    (cwd / "data" / "facebook__xnli" / "sw" / "validation.jsonl").write_bytes(
        '{"premise": "Mtoto analala.", "hypothesis": "Mtoto amepumzika.", "label": 0}\n'
        '{"premise": "caf\u00e9", "hypothesis": "b", "label": 1}\n'.encode("latin-1"))
    return str(cwd / "data")


BAD = {
    "unknown_output_type": (lambda cwd: [f"eval.include_path={_task_dir(cwd, 'generate')}", "eval.tasks=[my_qa]"],
                            ["my_qa", "output_type=generate", "generate_until", "multiple_choice"]),
    "local_file_not_utf8": (lambda cwd: ["eval=xnli", "eval.langs=[sw]", f"eval.data_dir={_latin1_copy(cwd)}"],
                            ["xnli_sw", "facebook__xnli/sw/validation.jsonl", "line 2", "not UTF-8"]),
    "unknown_suite": (lambda cwd: ["eval=nosuch"], ["eval=nosuch", "no such option", "xnli"]),
    "unknown_task": (lambda cwd: ["eval.tasks=[xnli_sww]"], ["unknown task xnli_sww", "xnli_sw"]),
    "tag_not_task": (lambda cwd: ["eval.tasks=[mgsm_cot_native]"], ["mgsm_cot_native", "tag"]),
    "unknown_language": (lambda cwd: ["eval=xnli", "eval.langs=[xx]"], ["eval.langs", "xx", "sw"]),
    "missing_local_file": (lambda cwd: ["eval=xnli", "eval.langs=[sw]", f"eval.data_dir={_partial_copy(cwd)}"],
                           ["xnli_sw", "missing local data file", "facebook__xnli/sw/validation.jsonl"]),
    "missing_fewshot_file": (lambda cwd: ["eval=mgsm", "eval.langs=[sw]", "eval.num_fewshot=2",
                                          f"eval.data_dir={_partial_copy(cwd)}"],
                             ["missing local data file", "juletxara__mgsm/sw/train.jsonl"]),
    "hub_dataset_offline": (lambda cwd: ["eval=xnli", "eval.langs=[sw]"],
                            ["facebook/xnli", "offline", "eval.data_dir", "facebook__xnli/sw/validation.jsonl"]),
    "not_a_model": (lambda cwd: [f"eval.model={_not_a_model(cwd)}"], ["eval.model=", "not a model"]),
    "no_such_model": (lambda cwd: ["eval.models=[base,/nonexistent/adapter]"], ["/nonexistent/adapter"]),
    "vllm_missing": (lambda cwd: ["eval.backend=vllm"], ["eval.backend=vllm", "vllm is not installed"]),
    "bad_batch_size": (lambda cwd: ["eval.batch_size=big"], ["eval.batch_size=big"]),
    "bad_task_key": (lambda cwd: ["eval.tasks=[{name: xnli_sw, shots: 2}]"], ["eval.tasks[0].shots"]),
    "bad_task_chat": (lambda cwd: ["eval.tasks=[{name: demo_words_en, apply_chat_template: sometimes}]"],
                      ["eval.tasks[0].apply_chat_template=sometimes", "true or false"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli, case):
    make_args, words = BAD[case]
    out = cli.cwd / "out"
    before = sorted(p.name for p in (cli.cwd / "outputs").iterdir())
    proc = cli("eval", *make_args(cli.cwd), f"output_dir={out}", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(proc, *words)
    assert not out.exists()
    assert sorted(p.name for p in (cli.cwd / "outputs").iterdir()) == before  # no runs/, no eval-data/


def test_checks_import_no_heavy_library(tmp_path):
    """Refusals come before torch, lm-eval, datasets or transformers are imported."""
    code = ("import sys, runpy; sys.argv = ['polyft', 'eval', 'eval=mgsm', 'eval.langs=[sw]']\n"
            "try:\n    runpy.run_module('polyft.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lm_eval', 'datasets', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "juletxara/mgsm" in proc.stderr and "offline" in proc.stderr
    assert proc.stdout.strip() == "[]"


def test_output_dir_holding_something_else_is_refused(cli):
    out = cli.cwd / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    proc = cli("eval", f"output_dir={out}")
    assert_user_error(proc, "output_dir", "holds something else")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


# ---------------------------------------------------------------- library parts

def test_task_languages():
    from polyft.eval.specs import task_language

    assert task_language("xnli_sw") == "sw"
    assert task_language("belebele_tel_Telu") == "te"
    assert task_language("belebele_kin_Latn") == "kin_Latn"
    assert task_language("mmlu_law") is None and task_language("numbers") is None
    assert task_language("numbers_plain", {"metadata": {"lang": "swa"}}) == "swa"


def test_suites_name_their_tasks_and_languages():
    """Every shipped suite resolves against lm-eval's task files; no tag, every task a language."""
    from omegaconf import OmegaConf

    from polyft.cli.compose import compose
    from polyft.config.rules import validate
    from polyft.eval.specs import resolve_tasks

    expected = {"mgsm": 22, "xnli": 15, "xcopa": 11, "xstorycloze": 11, "xwinograd": 6, "pawsx": 7}
    conf_dir = Path(__file__).resolve().parents[1] / "polyft" / "conf" / "eval"
    for suite in sorted(p.stem for p in conf_dir.glob("*.yaml")):
        cfg = compose("eval", [f"eval={suite}"])
        validate(cfg)
        specs = resolve_tasks(OmegaConf.to_container(cfg.eval.tasks))
        assert specs and all(s.lang for s in specs), suite
        if suite in expected:
            assert len(specs) == expected[suite], suite
        if suite == "mgsm":
            assert {s.lang for s in specs} == set("bn de en es fr ja ru sw te th zh".split())
            assert all(s.config["dataset_path"] == "juletxara/mgsm" for s in specs)
    belebele = {s.name for s in resolve_tasks(OmegaConf.to_container(compose("eval", ["eval=belebele"]).eval.tasks))}
    assert {"belebele_swh_Latn", "belebele_tel_Telu", "belebele_ben_Beng", "belebele_jpn_Jpan"} <= belebele


def test_result_rows_from_lm_eval_results():
    from polyft.eval.harness import ROW_KEYS, result_rows

    results = {
        "results": {"mgsm_direct_sw": {"alias": "mgsm_direct_sw", "name": "x", "sample_len": 4,
                                       "exact_match,flexible-extract": 0.25,
                                       "exact_match_stderr,flexible-extract": 0.1,
                                       "exact_match,remove_whitespace": 0.0,
                                       "exact_match_stderr,remove_whitespace": "N/A"}},
        "n-samples": {"mgsm_direct_sw": {"original": 250, "effective": 4}},
    }
    rows = result_rows(results, "base", {"mgsm_direct_sw": "sw"})
    assert [tuple(r) for r in rows] == [ROW_KEYS, ROW_KEYS]
    assert rows[0] == {"model": "base", "task": "mgsm_direct_sw", "lang": "sw", "metric": "exact_match",
                       "filter": "flexible-extract", "value": 0.25, "stderr": 0.1, "n": 4}
    assert rows[1]["stderr"] is None and rows[1]["filter"] == "remove_whitespace"


def test_demo_data_is_deterministic_and_multiple_choice_is_sound(tmp_path):
    from polyft.data.synthetic import NUMBER_WORDS
    from polyft.eval.data import plan_data, write_demo_data
    from polyft.eval.specs import resolve_tasks

    contents = []
    for root in (tmp_path / "a", tmp_path / "b"):
        specs = resolve_tasks(["demo_words_ja", "demo_arith_sw"])
        plan_data(specs, data_dir=None, demo_root=root, offline=True)
        for s in specs:
            write_demo_data(s)
        contents.append([Path(s.data_files[split]).read_text(encoding="utf-8") for s in specs
                         for split in ("test", "train")])
    assert contents[0] == contents[1]
    words = [json.loads(line) for line in contents[0][0].splitlines()]
    assert len(words) == 50 and {r["lang"] for r in words} == {"ja"}
    for r in words:
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        assert r["choices"][r["label"]] == r["response"] and set(r["choices"]) <= set(NUMBER_WORDS["ja"])
    assert {r["label"] for r in words} == {0, 1, 2, 3}
    arith = [json.loads(line) for line in contents[0][2].splitlines()]
    assert all(r["response"].lstrip("-").isdigit() for r in arith)


def test_xlsum_rouge_l_scores_every_script():
    import importlib.util

    from polyft.eval.specs import TASKS_DIR

    spec = importlib.util.spec_from_file_location("xlsum_utils", TASKS_DIR / "xlsum" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert utils.rouge_l("মুখ্যমন্ত্রী আজ বলেছেন", "মুখ্যমন্ত্রী বলেছেন") == pytest.approx(0.8)
    assert utils.rouge_l("東京は日本の首都です", "東京は首都です") > 0.7
    assert utils.rouge_l("Rais amesema leo", "Mvua imenyesha") == 0.0
