"""Rows from files, checked, for every reader: data sources (jsonl, csv, parquet), XTREME-UP
release files, LoraHub's few-shot file and local eval data.

A file whose bytes are not UTF-8, a jsonl line that is not a JSON object, an empty file, a
row without a field a reader needs, or a field that is not text where text is expected (a
number, a list, null) is refused with one line naming the file and the line (or row).
`read` gives (place, row) pairs, where place is "line N" (jsonl, csv) or "row N" (parquet);
`text` takes one field of a row. No torch here: the CLI reads files while checking.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from polyft.errors import PolyftError

KINDS = ("jsonl", "csv", "parquet")


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def decoded(path: Path, label: str, bom: bool = False) -> str:
    """The file's text; bytes that are not UTF-8 are one line naming their line."""
    blob = Path(path).read_bytes()
    try:
        return blob.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        line = blob[: exc.start].count(b"\n") + 1
        column = exc.start - (blob.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolyftError(f"{label}: line {line} is not UTF-8 text (byte 0x{blob[exc.start]:02x} at column "
                          f"{column}); save the file as UTF-8") from None


def jsonl(path: Path, label: str) -> list[tuple[str, dict]]:
    rows = []
    for i, line in enumerate(decoded(path, label).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PolyftError(f"{label}: line {i} is not valid JSON") from None
        if not isinstance(row, dict):
            raise PolyftError(f"{label}: line {i} is {_kind_of(row)}, not a JSON object of fields")
        rows.append((f"line {i}", row))
    return rows


def _csv(path: Path, label: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(decoded(path, label, bom=True), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:  # more cells than the header names
                raise PolyftError(f"{label}: line {reader.line_num} has more cells than the header's "
                                  f"{len(reader.fieldnames)} columns")
            rows.append((f"line {reader.line_num}", row))
    except csv.Error as exc:
        raise PolyftError(f"{label}: line {reader.line_num} is not valid CSV ({exc})") from None
    return rows


def _parquet(path: Path, label: str) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise PolyftError(f"{label}: not a parquet file ({type(exc).__name__})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def read(path: str | Path, kind: str, label: str | None = None) -> list[tuple[str, dict]]:
    """(place, row) of every row of a jsonl, csv or parquet file; an empty file is refused."""
    label = label or str(path)
    rows = {"jsonl": jsonl, "csv": _csv, "parquet": _parquet}[kind](Path(path), label)
    if not rows:
        raise PolyftError(f"{label}: no rows (the file is empty)")
    return rows


def text(label: str, place: str, row: dict, field: str, *, optional: bool = False) -> str | None:
    """row[field] as text. `optional`: a field that may be absent or null (then None)."""
    if field not in row:
        if optional:
            return None
        raise PolyftError(f"{label}: {place} has no field {field} (its fields: {', '.join(map(str, row)) or 'none'})")
    value = row[field]
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise PolyftError(f"{label}: {place}: field {field} is {_kind_of(value)}, where text is expected")
    return value
