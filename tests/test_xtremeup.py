"""XTREME-UP from a local release: the reader, its errors, the three metrics, eval and train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_refused, assert_user_error

SP = [
    {"input": "weka kengele saa moja", "target": "[IN:CREATE_ALARM [SL:DATE_TIME saa moja ] ]"},
    {"input": "hali ya hewa Nairobi", "target": "[IN:GET_WEATHER [SL:LOCATION Nairobi ] ]"},
    {"input": "piga simu kwa Amina", "target": "[IN:CREATE_CALL [SL:CONTACT Amina ] ]"},
    {"input": "cheza muziki", "target": "[IN:PLAY_MUSIC ]"},
]
QA = [
    {"question": "Mji mkuu wa Kenya ni upi?", "title": "Kenya",
     "context": "Kenya ni nchi ya Afrika Mashariki. Mji mkuu wake ni Nairobi.", "target": "Nairobi"},
    {"question": "Kenya iko wapi?", "title": "Kenya",
     "context": "Kenya ni nchi ya Afrika Mashariki. Mji mkuu wake ni Nairobi.", "target": "Afrika Mashariki"},
    {"question": "Mlima mrefu zaidi ni upi?", "title": "Kilimanjaro",
     "context": "Kilimanjaro ni mlima mrefu zaidi barani Afrika.", "target": "Kilimanjaro"},
]
MT = [
    {"input": "The house is big.", "target": "Nyumba ni kubwa."},
    {"input": "I drink water.", "target": "Ninakunywa maji."},
    {"input": "The child is sleeping.", "target": "Mtoto analala."},
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def release(tmp_path) -> Path:
    """A small release: three tasks in sw and bn; bn translation named as in the release (en2bn)."""
    root = tmp_path / "xtreme_up"
    for lang in ("sw", "bn"):
        write_jsonl(root / "semantic_parsing" / "train" / f"{lang}.jsonl", SP)
        write_jsonl(root / "semantic_parsing" / "test" / f"{lang}.jsonl", SP[:3])
        write_jsonl(root / "qa_in_lang" / "train" / f"{lang}.jsonl", QA[:2])
        write_jsonl(root / "qa_in_lang" / "test" / f"{lang}.jsonl", QA)
        mt_name = "sw.jsonl" if lang == "sw" else "en2bn.jsonl"
        write_jsonl(root / "translation" / "train" / mt_name, MT)
        write_jsonl(root / "translation" / "test" / mt_name, MT)
    write_jsonl(root / "semantic_parsing" / "validation" / "sw.jsonl", SP[:1])
    return root


def source(root: Path, task: str, langs=(), **kw):
    from polyft.config.schema import SourceConfig

    return SourceConfig(type="xtremeup", path=str(root), task=task, langs=list(langs), **kw)


# ---------------------------------------------------------------- reader

def test_reader_rows_prompts_and_features(release):
    from polyft.data.sources import load_source

    sp = load_source("data.sources.sp", source(release, "semantic_parsing", ["sw"]), 0, True)
    assert len(sp) == 4
    assert {(r["lang"], r["task"], r["source"]) for r in sp} == {("sw", "semantic_parsing", "sp")}
    assert [r["response"] for r in sp] == [r["target"] for r in SP]
    assert sp[0]["prompt"].endswith("\n\nweka kengele saa moja")

    val = load_source("data.sources.sp", source(release, "semantic_parsing", ["sw"], split="validation"), 0, True)
    assert [r["response"] for r in val] == [SP[0]["target"]]

    qa = load_source("data.sources.qa", source(release, "qa_in_lang"), 0, True)  # all languages
    assert sorted(r["lang"] for r in qa) == ["bn", "bn", "sw", "sw"]
    p = qa[0]["prompt"]
    # title, then passage, then the question last (long passages are cut from the left)
    assert p.index("Title: Kenya") < p.index("Passage: Kenya ni nchi") < p.index("Question: Mji mkuu wa Kenya")
    assert qa[0]["response"] == "Nairobi"

    mt = load_source("data.sources.mt", source(release, "translation", features={"task": "mt"}), 0, True)
    assert {(r["lang"], r["task"]) for r in mt} == {("bn", "mt"), ("sw", "mt")}  # en2bn.jsonl is bn
    sw = [r for r in mt if r["lang"] == "sw"]
    assert [r["prompt"] for r in sw] == [f"Translate from English to Swahili.\n\n{r['input']}" for r in MT]
    assert [r["response"] for r in sw] == [r["target"] for r in MT]
    assert next(r for r in mt if r["lang"] == "bn")["prompt"].startswith("Translate from English to Bengali.")


def test_mixture_rows_carry_lang_and_task(release):
    from omegaconf import OmegaConf

    from polyft.cli.compose import compose
    from polyft.config.rules import validate
    from polyft.data.mixture import load_mixture

    cfg = compose("train", ["data=xtremeup", f"eval.xtremeup_root={release}",
                            "data.sources.translation.langs=[sw]"])
    validate(cfg)
    rows = load_mixture(cfg.data, True)
    seen = {(r["task"], r["lang"]) for r in rows}
    assert seen == {("semantic_parsing", "sw"), ("semantic_parsing", "bn"), ("qa_in_lang", "sw"),
                    ("qa_in_lang", "bn"), ("translation", "sw")}
    assert OmegaConf.select(cfg, "data.sources.qa_in_lang.path") == str(release)


def test_bad_rows_are_one_line(tmp_path):
    from polyft.data.sources import load_source
    from polyft.errors import PolyftError

    root = tmp_path / "r"
    write_jsonl(root / "qa_in_lang" / "train" / "sw.jsonl", [QA[0], {"question": "q", "context": "c", "target": "t"}])
    with pytest.raises(PolyftError, match=r"sw.jsonl: line 2 has no field title"):
        load_source("data.sources.qa", source(root, "qa_in_lang", ["sw"]), 0, True)


MISSING = {
    "root": (lambda r: [f"eval.xtremeup_root={r.parent / 'nowhere'}"], ["nowhere", "no such directory",
                                                                         "<root>/<task>/<split>/<lang>.jsonl"]),
    "task": (lambda r: [f"eval.xtremeup_root={r / 'translation'}"],
             ["no task directory", "semantic_parsing", "tasks there: test, train"]),
    "lang": (lambda r: [f"eval.xtremeup_root={r}", "data.sources.qa_in_lang.langs=[sw,te]"],
             ["qa_in_lang/train/te.jsonl", "languages there: bn, sw"]),
    "split": (lambda r: [f"eval.xtremeup_root={r}", "data.sources.qa_in_lang.split=validation"],
              ["qa_in_lang/validation", "splits there: test, train"]),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_release_files_refused_by_train(cli, release, case):
    args, words = MISSING[case]
    assert_refused(cli, "train", "data=xtremeup", *args(release), words=words)


def test_missing_release_files_refused_by_eval(cli, release):
    assert_refused(cli, "eval", "eval=xtremeup", "eval.langs=[sw]",
                   words=["xtremeup_semantic_parsing_sw", "eval.xtremeup_root=DIR"])
    # te has no files in this release; the suite lists it for qa_in_lang and translation
    assert_refused(cli, "eval", "eval=xtremeup", f"eval.xtremeup_root={release}", "eval.langs=[te]",
                   words=["xtremeup_qa_in_lang_te", "qa_in_lang/test/te.jsonl", "languages there: bn, sw"])
    assert_refused(cli, "eval", "eval=xtremeup", "eval.langs=[sw]", f"eval.xtremeup_root={release.parent / 'gone'}",
                   words=["gone", "no such directory"])
    proc = cli("eval", "eval=xtremeup", f"eval.xtremeup_root={release}", "eval.tasks=[xtremeup_ner_sw]")
    assert_user_error(proc, "unknown task xtremeup_ner_sw")


# ---------------------------------------------------------------- metrics

def test_metrics_on_hand_computed_examples():
    import sacrebleu

    from polyft.eval.tasks.xtremeup import utils

    # exact match: whitespace runs and ends do not count; anything else does
    gold = "[IN:GET_WEATHER [SL:LOCATION Nairobi ] ]"
    assert utils.exact_match(gold, "  [IN:GET_WEATHER   [SL:LOCATION Nairobi ]\t]") == 1.0
    assert utils.exact_match(gold, "[IN:GET_WEATHER [SL:LOCATION nairobi ] ]") == 0.0
    assert utils.exact_match(gold, "[IN:GET_WEATHER [SL:LOCATION Nairobi ]]") == 0.0

    # token F1: P = 1/3, R = 1 -> 0.5 (case and punctuation dropped, "the" kept: no article list)
    assert utils.token_f1("Nairobi", "the NAIROBI city!") == pytest.approx(0.5)
    # P = 2/2, R = 2/3 -> 0.8 (words: "afrika", "mashariki" vs gold + "ya")
    assert utils.token_f1("ya Afrika Mashariki", "Afrika, Mashariki.") == pytest.approx(0.8)
    assert utils.token_f1("東京都", "東京") == pytest.approx(0.8)  # Han: one token per character
    assert utils.token_f1("नमस्ते दुनिया", "नमस्ते") == pytest.approx(2 / 3)  # vowel signs stay in words
    assert utils.token_f1("Nairobi", "Mombasa") == 0.0
    assert utils.token_f1("", "") == 1.0 and utils.token_f1("", "Nairobi") == 0.0
    assert utils.answer_tokens("Mji wa Nairobi, Kenya.") == ["mji", "wa", "nairobi", "kenya"]

    # chrF: "aa" vs "ab": unigram P = R = 1/2 (F = 1/2), bigram 0, no longer n-grams -> 25
    assert utils.corpus_chrf([("ab", "aa")]) == pytest.approx(25.0)
    assert utils.corpus_chrf([("Mtoto analala.", "Mtoto analala.")]) == pytest.approx(100.0)
    # corpus level: statistics summed before the F-score. Orders 1-3 only (nothing longer):
    # P = R = 4/5, 2/3 and 1 -> (0.8 + 2/3 + 1) / 3, not the mean of 25 and 100
    pairs = [("ab", "aa"), ("xyz", "xyz")]
    assert utils.corpus_chrf(pairs) == pytest.approx(100 * (0.8 + 2 / 3 + 1) / 3)
    refs, hyps = [r for r, _ in MT] + ["ab"], ["Nyumba kubwa.", "Nakunywa maji", "Mtoto analala sana.", "aa"]
    assert utils.corpus_chrf(list(zip(refs, hyps))) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert utils.corpus_chrf([("ab", "aa")]) == pytest.approx(sacrebleu.sentence_chrf("aa", ["ab"]).score)


# ---------------------------------------------------------------- end to end

def test_eval_suite_scores_every_task_and_language(cli, release, tiny_llama_dir):
    from transformers import AutoTokenizer

    from polyft.data import xtremeup
    from polyft.eval.tasks.xtremeup import utils

    proc = cli("eval", "eval=xtremeup", f"eval.xtremeup_root={release}", "eval.langs=[sw,bn]", "eval.limit=3",
               "+eval.gen_kwargs.max_gen_toks=6", "eval.batch_size=8", "eval.log_samples=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(next((cli.cwd / "outputs" / "runs").rglob("run.json")).read_text())
    rows = {(r["task"], r["lang"]): r for r in record["metrics"]["results"]}
    metric = {"semantic_parsing": "exact_match", "qa_in_lang": "f1", "translation": "chrf"}
    assert set(rows) == {(f"xtremeup_{t}_{lang}", lang) for t in metric for lang in ("sw", "bn")}
    art = Path(record["artifacts"][0]["path"])
    for (task, lang), row in rows.items():
        xu_task = task[len("xtremeup_"):-len(lang) - 1]
        assert row["metric"] == metric[xu_task] and row["n"] == 3 and row["model"] == "base"
        # the value is the metric of the logged answers against the release targets
        samples = [json.loads(line) for line in (art / "samples" / f"{task}.jsonl").read_text().splitlines()]
        pairs = [(s["doc"]["response"], s["filtered_resps"][0]) for s in samples]
        source = {"semantic_parsing": SP, "qa_in_lang": QA, "translation": MT}[xu_task]
        assert [ref for ref, _ in pairs] == [r["target"] for r in source[:3]]
        if xu_task == "translation":
            assert row["value"] == pytest.approx(utils.corpus_chrf([(r, p.strip()) for r, p in pairs]))
        else:
            fn = utils.exact_match if xu_task == "semantic_parsing" else utils.token_f1
            assert row["value"] == pytest.approx(sum(fn(r, p) for r, p in pairs) / 3)
    # prompts are the training rows' prompts, in the chat template `polyft train` formats with
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for task, lang, src in (("translation", "bn", MT), ("qa_in_lang", "sw", QA)):
        sample = json.loads((art / "samples" / f"xtremeup_{task}_{lang}.jsonl").read_text().splitlines()[0])
        user = [{"role": "user", "content": xtremeup.to_rows(src, task, lang)[0]["prompt"]}]
        assert sample["arguments"][0][0] == tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    conf = yaml.safe_load((art / "tasks" / "xtremeup_translation_bn.yaml").read_text())
    test_file = release.resolve() / "translation" / "test" / "en2bn.jsonl"
    assert conf["dataset_kwargs"]["data_files"] == {"test": str(test_file)}
    assert conf["metadata"]["lang"] == "bn" and conf["fewshot_split"] is None


def test_specs_carry_lang_and_task_feature():
    from omegaconf import OmegaConf

    from polyft.cli.compose import compose
    from polyft.eval.specs import resolve_tasks

    cfg = compose("eval", ["eval=xtremeup", "eval.langs=[sw]"])
    specs = resolve_tasks(OmegaConf.to_container(cfg.eval.tasks), langs=["sw"])
    assert {(s.name, s.lang, s.task_feature) for s in specs} == {
        ("xtremeup_semantic_parsing_sw", "sw", "semantic_parsing"), ("xtremeup_qa_in_lang_sw", "sw", "qa_in_lang"),
        ("xtremeup_translation_sw", "sw", "translation")}


def test_train_on_an_xtremeup_mixture(cli, release):
    out = cli.cwd / "adapter"
    proc = cli("train", "data=xtremeup", f"eval.xtremeup_root={release}", "data.sources.semantic_parsing.langs=[sw]",
               "train.max_steps=1", "train.batch_size=4", "logger=none", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    import datasets

    cached = [d for d in (cli.cwd / "outputs" / "cache" / "data").iterdir() if d.is_dir()]
    assert len(cached) == 1
    ds = datasets.load_from_disk(str(cached[0]))
    # 4 sw parses + 2 x 2 QA + 2 x 3 translations, each with its task and language
    assert sorted(set(zip(ds["task"], ds["lang"]))) == [
        ("qa_in_lang", "bn"), ("qa_in_lang", "sw"), ("semantic_parsing", "sw"), ("translation", "bn"),
        ("translation", "sw")]
