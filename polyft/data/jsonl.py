"""Reading jsonl files row by row, with one-line errors (sources, XTREME-UP, LoraHub shots)."""

from __future__ import annotations

import json
from pathlib import Path

from polyft.errors import PolyftError


def jsonl_rows(path: Path, label: str | None = None):
    """(line number, parsed row) of a jsonl file, blank lines skipped; a line that is not
    JSON is one line naming `label` (default: the path) and the line number."""
    with Path(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError:
                    raise PolyftError(f"{label or path}: line {i} is not valid JSON") from None
