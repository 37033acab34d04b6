"""Every reader refuses bad bytes and bad shapes in one line naming the file and the line:
data sources (jsonl, csv, parquet), XTREME-UP release files, LoraHub's few-shot file and
local eval data. The defects are the same for each: bytes that are not UTF-8, a number,
a list or null where text is expected, an empty file, a row without the fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from polyft.errors import PolyftError

GOOD = {"prompt": "What is 2 + 2?", "response": "4"}
# defect -> (the second row's fields, or raw bytes for the whole file; words of the refusal)
DEFECTS = {
    "not_utf8": (b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n',
                 ["line 2", "not UTF-8", "0xe9"]),
    "number": ({"prompt": 5, "response": "b"}, ["line 2", "prompt", "a number (5)"]),
    "list": ({"prompt": "a", "response": ["b", "c"]}, ["line 2", "response", "a list"]),
    "null": ({"prompt": None, "response": "b"}, ["line 2", "prompt", "null"]),
    "empty": (b"", ["no rows"]),
    "no_fields": ({"question": "a", "answer": "b"}, ["line 2", "no field", "prompt"]),
    "not_an_object": (b'{"prompt": "a", "response": "b"}\n["a", "b"]\n', ["line 2", "a list", "not a JSON object"]),
}


def write_jsonl(path: Path, second, first: dict = GOOD) -> Path:
    """A good row, then the defect's (or the defect's bytes as the whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(second, bytes):
        path.write_bytes(second)
    else:
        path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    return path


def assert_one_line(exc: pytest.ExceptionInfo, path: Path, words: list[str]) -> None:
    text = str(exc.value)
    assert "\n" not in text and str(path) in text, text
    for w in words:
        assert w in text, (w, text)


def source(path: Path, kind: str, **extra):
    from polyft.config.schema import SourceConfig

    return OmegaConf.merge(OmegaConf.structured(SourceConfig),
                           {"type": kind, "path": str(path), "features": {"lang": "en"}, **extra})


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_jsonl_source(tmp_path, defect):
    from polyft.data.sources import load_source

    second, words = DEFECTS[defect]
    path = write_jsonl(tmp_path / "rows.jsonl", second)
    with pytest.raises(PolyftError) as exc:
        load_source("data.sources.extra", source(path, "jsonl"), 0, True)
    assert_one_line(exc, path, words)
    assert "data.sources.extra" in str(exc.value)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_lorahub_shots(tmp_path, defect):
    from polyft.merge.lorahub import few_shot_rows

    second, words = DEFECTS[defect]
    path = write_jsonl(tmp_path / "shots.jsonl", second)
    cfg = OmegaConf.create({"merge": {"data": str(path), "prompt_field": "prompt", "response_field": "response",
                                      "max_length": None}})

    class NoOptions:  # merge.data names a file, not a data option
        def data(self, node):
            return None

    with pytest.raises(PolyftError) as exc:
        few_shot_rows(cfg, NoOptions())
    if defect == "no_fields":
        words = ["line 2", "lacks 'prompt'", "merge.prompt_field"]
    assert_one_line(exc, path, words)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_xtremeup_file(tmp_path, defect):
    from polyft.data import xtremeup

    second, words = DEFECTS[defect]
    rename = {"prompt": "input", "response": "target"}  # a semantic parsing row's fields
    path = tmp_path / "semantic_parsing" / "train" / "sw.jsonl"
    if isinstance(second, bytes):
        write_jsonl(path, second.replace(b'"prompt"', b'"input"').replace(b'"response"', b'"target"'))
    else:
        write_jsonl(path, {rename.get(k, k): v for k, v in second.items()}, first={"input": "a", "target": "b"})
    words = [rename.get(w, w) for w in words]
    with pytest.raises(PolyftError) as exc:
        xtremeup.read_file(path, "semantic_parsing")
    assert_one_line(exc, path, words)


@pytest.mark.parametrize("defect", ["not_utf8", "empty", "no_fields", "not_an_object"])
def test_local_eval_data(tmp_path, defect):
    """Eval rows keep their dataset's fields and types (a null answer, a label number): the
    reader refuses bytes, shapes and rows without the fields the task's prompts name."""
    from polyft.eval.data import check_local_files
    from polyft.eval.specs import TaskSpec

    second, words = DEFECTS[defect]
    path = write_jsonl(tmp_path / "test.jsonl", second)
    spec = TaskSpec("t", None, tmp_path / "t.yaml", {"doc_to_text": "Q: {{prompt}}", "doc_to_target": "response"},
                    data_files={"test": str(path)})
    with pytest.raises(PolyftError) as exc:
        check_local_files(spec)
    assert_one_line(exc, path, words)
    write_jsonl(path, {"prompt": "a", "response": None})  # a null answer is a dataset's own
    check_local_files(spec)


CSV = {
    "not_utf8": (b"prompt,response\na,b\ncaf\xe9,b\n", ["line 3", "not UTF-8"]),
    "short_row": (b"prompt,response\na,b\nc\n", ["line 3", "response", "null"]),
    "long_row": (b"prompt,response\na,b\nc,d,e\n", ["line 3", "more cells"]),
    "empty": (b"", ["no rows"]),
    "header_only": (b"prompt,response\n", ["no rows"]),
}


@pytest.mark.parametrize("defect", sorted(CSV))
def test_csv_source(tmp_path, defect):
    from polyft.data.sources import load_source

    blob, words = CSV[defect]
    path = tmp_path / "rows.csv"
    path.write_bytes(blob)
    with pytest.raises(PolyftError) as exc:
        load_source("data.sources.extra", source(path, "csv"), 0, True)
    assert_one_line(exc, path, words)


PARQUET = {
    "number": ({"prompt": ["a", "b"], "response": [1, 2]}, ["row 1", "response", "a number (1)"]),
    "list": ({"prompt": ["a", "b"], "response": [["x"], ["y"]]}, ["row 1", "response", "a list"]),
    "null": ({"prompt": ["a", None], "response": ["b", "c"]}, ["row 2", "prompt", "null"]),
    "bytes": ({"prompt": [b"caf\xe9", b"a"], "response": ["b", "c"]}, ["row 1", "prompt", "bytes"]),
    "empty": ({"prompt": [], "response": []}, ["no rows"]),
}


@pytest.mark.parametrize("defect", sorted(PARQUET))
def test_parquet_source(tmp_path, defect):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polyft.data.sources import load_source

    columns, words = PARQUET[defect]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table(columns) if columns["prompt"] else
                   pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), path)
    with pytest.raises(PolyftError) as exc:
        load_source("data.sources.extra", source(path, "parquet"), 0, True)
    assert_one_line(exc, path, words)


def test_a_file_that_is_not_parquet(tmp_path):
    from polyft.data.sources import load_source

    path = tmp_path / "rows.parquet"
    path.write_text("prompt,response\n")
    with pytest.raises(PolyftError) as exc:
        load_source("data.sources.extra", source(path, "parquet"), 0, True)
    assert_one_line(exc, path, ["not a parquet file"])


def test_good_rows_of_each_kind_read_the_same(tmp_path):
    """The same rows from jsonl, csv and parquet: the same training rows."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from polyft.data.sources import load_source

    rows = [{"prompt": f"What is {i} + 1?", "response": str(i + 1)} for i in range(3)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "r.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["prompt", "response"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    got = [load_source("data.sources.x", source(tmp_path / f"r.{k}", k), 0, True) for k in ("jsonl", "csv", "parquet")]
    assert got[0] == got[1] == got[2]
    assert [(r["prompt"], r["response"], r["lang"]) for r in got[0]] == [(r["prompt"], r["response"], "en") for r in rows]
