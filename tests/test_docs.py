"""The README and docs/ stay true: the config-groups table is generated from conf/, every
relative link resolves, and the README stays a first page (under 400 lines)."""

from __future__ import annotations

import importlib.util
import re
import sys

from conftest import REPO


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_readme_config_groups_table_is_generated_from_conf():
    m = load("config_groups")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert m.readme_table(readme) == m.table(), "run: python scripts/config_groups.py --write"
    # every option file of every group is in it (the table is not a hand-picked subset)
    for group in ("model", "data", "merge", "exp"):
        for f in (REPO / "polyft" / "conf" / group).glob("*.yaml"):
            assert f"`{f.stem}`" in m.readme_table(readme), (group, f.stem)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_readme_is_a_first_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 400
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
