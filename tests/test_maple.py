"""MAPLE as the paper ran it: LoRA alpha that follows the rank (adapter.alpha_ratio), the
MultiAlpaca data option, and zero-shot marks in the report for languages never trained on."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, assert_refused, assert_user_error

CONF = REPO / "polyft" / "conf"
FAST = ["logger=none", "train.max_steps=2", "train.save_steps=2"]
MULTIALPACA_LANGS = ["ar", "de", "es", "fr", "id", "ja", "ko", "pt", "ru", "th", "vi"]


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def adapter_cfg(**values):
    from polyft.config.schema import AdapterConfig

    return OmegaConf.merge(OmegaConf.structured(AdapterConfig), OmegaConf.load(CONF / "adapter" / "lora.yaml"),
                           values)


# ------------------------------------------------------------------ alpha_ratio: the product key

def test_product_key_holds_the_alpha_used_not_how_it_was_given():
    from polyft.products import adapter_key

    fixed = adapter_key(adapter_cfg(r=64, alpha=128))
    assert "alpha_ratio" not in fixed and fixed["alpha"] == 128.0  # keys made before the ratio are unchanged
    # ratio 2 at r=64 trains the same weights as alpha 128: one product
    assert adapter_key(adapter_cfg(r=64, alpha=None, alpha_ratio=2.0)) == fixed
    # the ratio wins over a number in alpha
    assert adapter_key(adapter_cfg(r=64, alpha=7, alpha_ratio=2.0)) == fixed
    r8 = adapter_key(adapter_cfg(r=8, alpha=None, alpha_ratio=2.0))
    assert r8["alpha"] == 16.0 and r8 != fixed
    flix = adapter_key(OmegaConf.merge(adapter_cfg(), OmegaConf.load(CONF / "adapter" / "flix.yaml")))
    assert "alpha_ratio" not in flix
    assert adapter_key(adapter_cfg(type="full", alpha_ratio=2.0)) == {"type": "full"}


# ------------------------------------------------------------------ alpha_ratio: refused values

BAD_RATIO = {
    "zero": (["adapter.alpha_ratio=0"], ["adapter.alpha_ratio=0", "> 0"]),
    "negative": (["adapter.alpha_ratio=-2"], ["adapter.alpha_ratio=-2", "> 0"]),
    "infinite": (["adapter.alpha_ratio=inf"], ["adapter.alpha_ratio=inf", "> 0"]),
    "text": (["adapter.alpha_ratio=abc"], ["adapter.alpha_ratio=abc"]),
    "flix": (["adapter=flix", "adapter.alpha_ratio=2"], ["adapter.alpha_ratio=2", "adapter=flix", "null"]),
    "no_alpha_at_all": (["adapter.alpha=null"], ["adapter.alpha=None", "adapter.alpha_ratio"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RATIO))
def test_bad_alpha_ratio_is_refused(cli, case):
    args, words = BAD_RATIO[case]
    assert_refused(cli, "train", *FAST, *args, words=words)


def test_full_fine_tuning_ignores_the_ratio_as_it_ignores_alpha(cli):
    proc = cli("run", "+exp=maple", "adapter=full", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ alpha_ratio: trained adapters

def _peft_scalings(adapter_dir: Path) -> set[float]:
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path)
    model = PeftModel.from_pretrained(base, adapter_dir)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    return {round(m.scaling["default"], 9) for m in layers}


def test_alpha_follows_the_rank_in_the_trained_adapters_and_products_are_reused(cli, tiny_llama_dir):
    sweep = cli.cwd / "sweep"
    ratio = 2.0
    # alpha=999 is given too: the ratio wins
    proc = cli("train", *FAST, "-m", "adapter.r=2,4", f"adapter.alpha_ratio={ratio}", "adapter.alpha=999",
               f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    products = {}
    for i, r in enumerate((2, 4)):
        rec = run_json(sweep / str(i))
        assert rec["status"] == "ok" and rec["config"]["adapter"]["r"] == r
        product = Path(rec["artifacts"][0]["path"])
        conf = json.loads((product / "adapter_config.json").read_text())
        assert conf["r"] == r and conf["lora_alpha"] == ratio * r
        assert _peft_scalings(product) == {ratio}  # alpha / r: the same step size at both ranks
        assert rec["product"]["lora_alpha"] == ratio * r
        assert rec["train"]["lora_alpha"] == ratio * r
        manifest = json.loads((product / "manifest.json").read_text())
        assert manifest["key"]["adapter"]["alpha"] == ratio * r and "alpha_ratio" not in manifest["key"]["adapter"]
        products[r] = product
    assert products[2] != products[4]

    # the same config again, and r=4 with the same alpha given as a number: both reuse the product
    for args in ([f"adapter.alpha_ratio={ratio}", "adapter.alpha=999"], ["adapter.alpha=8"]):
        again = cli("train", *FAST, "adapter.r=4", *args)
        assert again.returncode == 0, again.stderr[-3000:]
        rec = run_json(sorted((cli.cwd / "outputs" / "runs").rglob("run.json"))[-1].parent)
        assert rec["artifacts"][0]["reused"] and Path(rec["artifacts"][0]["path"]) == products[4], rec["artifacts"]
        assert rec["product"]["lora_alpha"] == 8.0


def _points(stdout: str) -> list[tuple[str, dict]]:
    """(header, config) of each sweep point `-m ... --cfg job` printed."""
    chunks = stdout.split("# sweep point ")[1:]
    return [(c.splitlines()[0], yaml.safe_load(c.split("\n", 1)[1])) for c in chunks]


@pytest.mark.parametrize("exp,ratio", [("maple", 2.0), ("maple_real", 1.0)])
def test_cfg_job_of_a_rank_sweep_shows_alpha_over_r(cli, exp, ratio):
    proc = cli("run", f"+exp={exp}", "-m", "adapter.r=8,64", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = _points(proc.stdout)
    assert [cfg["adapter"]["r"] for _, cfg in points] == [8, 64]
    for header, cfg in points:
        r = cfg["adapter"]["r"]
        assert cfg["adapter"]["alpha_ratio"] == ratio and cfg["adapter"]["alpha"] is None
        assert header.startswith(f"0: adapter.r={r}" if r == 8 else f"1: adapter.r={r}")
        assert f"= {ratio * r:g})" in header, header
        assert cfg["exp_name"] == exp
    assert not (cli.cwd / "outputs" / "runs").exists() and not (cli.cwd / "outputs" / "multirun").exists()


def test_cfg_job_of_a_sweep_takes_package_and_refuses_a_bad_kind(cli):
    proc = cli("run", "+exp=maple", "-m", "adapter.r=8,16", "--cfg", "job", "-p", "adapter")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [cfg["r"] for _, cfg in _points(proc.stdout)] == [8, 16]
    assert_user_error(cli("run", "+exp=maple", "-m", "adapter.r=8,16", "--cfg", "jobs"), "--cfg jobs")


# ------------------------------------------------------------------ MultiAlpaca

def write_multialpaca(root: Path, langs=MULTIALPACA_LANGS) -> dict[str, list[dict]]:
    """Files in the hub repo's layout: <lang>.jsonl, rows {instruction, input, output}."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {}
    for lang in langs:
        rows[lang] = [{"instruction": f"[{lang}] Name a colour.", "input": "", "output": f"[{lang}] Blue."},
                      {"instruction": f"[{lang}] Add the numbers.", "input": "2 and 3", "output": f"[{lang}] 5"}]
        (root / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[lang]))
    return rows


def local_multialpaca(root: Path) -> list[str]:
    return [o for lang in MULTIALPACA_LANGS for o in
            (f"data.sources.multialpaca_{lang}.type=jsonl", f"data.sources.multialpaca_{lang}.path={root}")]


def test_multialpaca_offline_says_how_to_use_a_local_copy(cli):
    assert_refused(cli, "train", *FAST, "data=multialpaca",
                   words=["data.sources.multialpaca_ar", "DAMO-NLP-MT/multialpaca", "offline",
                          "type=jsonl", "ar.jsonl"])


def test_multialpaca_local_copy_maps_each_file_to_its_language(tmp_path):
    from polyft.config.schema import SourceConfig
    from polyft.data.sources import load_source

    write_multialpaca(tmp_path / "ma", ["ar", "ko"])
    shipped = OmegaConf.load(CONF / "data" / "multialpaca.yaml")
    assert sorted(shipped.sources) == [f"multialpaca_{lang}" for lang in MULTIALPACA_LANGS]
    for lang in ("ar", "ko"):
        src = OmegaConf.merge(OmegaConf.structured(SourceConfig), shipped.sources[f"multialpaca_{lang}"],
                              {"type": "jsonl", "path": str(tmp_path / "ma")})
        got = load_source(f"data.sources.multialpaca_{lang}", src, 0, offline=True)
        assert [(r["prompt"], r["response"], r["lang"], r["task"]) for r in got] == [
            (f"[{lang}] Name a colour.", f"[{lang}] Blue.", lang, "instruct"),
            (f"[{lang}] Add the numbers.\n\n2 and 3", f"[{lang}] 5", lang, "instruct")]


def test_multialpaca_local_directory_without_the_file_is_refused(cli, tmp_path):
    write_multialpaca(tmp_path / "ma", ["ar"])
    assert_refused(cli, "train", *FAST, "data=multialpaca", *local_multialpaca(tmp_path / "ma"),
                   words=["data.sources.multialpaca_de.data_files=de.jsonl", "no such file"])


def test_maple_trains_on_multialpaca_from_a_local_copy(cli, tmp_path, tiny_llama_dir):
    write_multialpaca(tmp_path / "ma")
    out = cli.cwd / "product"
    proc = cli("train", *FAST, "data=multialpaca", "data.max_length=64", *local_multialpaca(tmp_path / "ma"),
               f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["train_langs"] == sorted(MULTIALPACA_LANGS)


def test_maple_mixes_bactrian_x_and_multialpaca(cli):
    proc = cli("run", "+exp=maple", "data=[bactrian_x,multialpaca]", "--cfg", "job", "-p", "data")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sources = yaml.safe_load(proc.stdout.split("\n", 1)[1])["sources"]
    bactrian = yaml.safe_load((CONF / "data" / "bactrian_x.yaml").read_text())["sources"]
    assert set(sources) == set(bactrian) | {f"multialpaca_{lang}" for lang in MULTIALPACA_LANGS}
    assert sources["de"]["path"] == "MBZUAI/Bactrian-X" and sources["multialpaca_de"]["data_files"] == "de.jsonl"


def test_maple_trains_on_every_language_it_evaluates():
    data = yaml.safe_load((CONF / "data" / "bactrian_x.yaml").read_text())
    trained = {s["features"]["lang"] for s in data["sources"].values()}
    evaluated = {t["lang"] for t in yaml.safe_load((CONF / "eval" / "maple.yaml").read_text())["tasks"]}
    assert evaluated <= trained, evaluated - trained
    real = yaml.safe_load((CONF / "exp" / "maple_real.yaml").read_text())
    demo = yaml.safe_load((CONF / "data" / "demo_maple.yaml").read_text())
    assert set(real["eval"]["langs"]) <= {lg for s in demo["sources"].values() for lg in s["langs"]}


# ------------------------------------------------------------------ zero-shot marks in the report

def _manifest(d: Path, **m) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_trained_languages_come_from_the_products_manifests(tmp_path):
    from polyft.commands.report import trained_langs

    new = _manifest(tmp_path / "new", kind="adapter", train_langs=["de", "en"])
    synthetic = {"type": "synthetic", "langs": ["en", "sw", "ja"], "features": {"task": "math"}}
    fixed = {"type": "jsonl", "features": {"lang": "te"}}
    old = _manifest(tmp_path / "old", kind="model", key={"data": {"sources": {"a": synthetic, "b": fixed},
                                                                   "languages": ["sw", "te", "xx"]}})
    by_rows = _manifest(tmp_path / "rows", kind="adapter",
                        key={"data": {"sources": {"a": {"type": "jsonl", "lang_field": "lang", "features": {}}}}})
    merged = _manifest(tmp_path / "merged", kind="merged", inputs=[str(new), str(old)])
    with_base = _manifest(tmp_path / "merged2", kind="merged", inputs=[str(new), str(tmp_path / "plain")])
    (tmp_path / "plain").mkdir()
    assert trained_langs(new) == ["de", "en"]
    assert trained_langs(old) == ["sw", "te"]  # data.languages keeps only these
    assert trained_langs(by_rows) is None  # the rows say, and the report does not read data
    assert trained_langs(merged) == ["de", "en", "sw", "te"]
    assert trained_langs(with_base) is None
    assert trained_langs(tmp_path / "plain") is None and trained_langs("org/hub-model") is None
    # a continued adapter also learned what its init did: unknown unless recorded
    unknown_init = _manifest(tmp_path / "cont", kind="adapter", train_langs=None)
    old_cont = _manifest(tmp_path / "old_cont", kind="adapter",
                         key={"data": {"sources": {"b": fixed}}, "adapter": {"init_from": {"path": str(new)}}})
    assert trained_langs(unknown_init) is None and trained_langs(old_cont) is None


def test_a_continued_adapter_keeps_the_languages_of_the_one_it_continues(tmp_path):
    from polyft.training import train_langs

    init = _manifest(tmp_path / "en_lora", kind="adapter", train_langs=["en"])
    (tmp_path / "foreign").mkdir()
    rows = [{"lang": "sw"}, {"lang": "sw"}]

    assert train_langs(rows, None) == ["sw"]
    assert train_langs(rows, str(init)) == ["en", "sw"]
    assert train_langs(rows, str(tmp_path / "foreign")) is None  # an adapter from elsewhere


def _row(variant, lang, value, zero_shot):
    return {"variant": variant, "model": variant, "task": f"demo_arith_{lang}", "lang": lang,
            "metric": "exact_match", "filter": "none", "value": value, "point": {}, "zero_shot": zero_shot}


def test_tables_mark_zero_shot_cells_only():
    from polyft.commands.report import ZERO_SHOT, build_tables, to_csv, to_latex, to_markdown

    rows = [_row("base", "en", 0.1, None), _row("base", "sw", 0.2, None),
            _row("tuned", "en", 0.5, False), _row("tuned", "sw", 0.25, True), _row("tuned", "te", 0.0, True)]
    (table,) = build_tables(rows)
    md = to_markdown(table)
    assert f"| tuned | 50.0 | 25.0{ZERO_SHOT} | 0.0{ZERO_SHOT} |" in md, md
    assert "| base | 10.0 | 20.0 | — |" in md, md
    assert "zero-shot" in md.splitlines()[-1]
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))  # the long CSV: a column of its own
    assert [(r["row"], r["lang"], r["zero_shot"]) for r in parsed] == [
        ("base", "en", ""), ("base", "sw", ""), ("tuned", "en", "false"), ("tuned", "sw", "true"), ("tuned", "te", "true")]
    assert [r["value"] for r in parsed if r["row"] == "tuned"] == ["50", "25", "0"]  # the cells stay numbers
    assert r"25.0$^\dagger$" in to_latex(table) and r"50.0$^\dagger$" not in to_latex(table)
    (plain,) = build_tables([{**r, "zero_shot": None} for r in rows])
    assert ZERO_SHOT not in to_markdown(plain)


def test_maple_real_report_marks_languages_the_run_did_not_train(cli, tiny_llama_dir):
    """maple_real on the tiny model, trained without Swahili: its Swahili scores are zero-shot."""
    proc = cli("run", "+exp=maple_real", "model=tiny-llama", "data.languages=[en,de,ja]", "train.max_steps=2",
               "train.save_steps=2", "eval.langs=[en,sw]", "eval.limit=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    tuned = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| tuned |")]
    base = [line for line in lines if line.startswith("| base |")]
    assert len(tuned) == 2 and len(base) == 2, proc.stdout  # demo_arith and demo_words
    for cells in tuned:  # columns: model, en, sw, avg, high, low
        assert not cells[1].endswith("†") and cells[2].endswith("†"), cells
    assert all("†" not in line for line in base)
    run_dir = sorted((cli.cwd / "outputs" / "runs").rglob("run.json"))[-1].parent
    rec = run_json(run_dir)
    assert rec["trained"]["tuned"]["train_langs"] == ["de", "en", "ja"]
    results = list(csv.DictReader(io.StringIO((run_dir / "report" / "results.csv").read_text())))
    assert {(r["lang"], r["zero_shot"]) for r in results if r["model"] == "tuned"} == {("en", "false"), ("sw", "true")}
