"""docs/how-it-works.md's "Where things live" stays true: every module of the package is listed,
and every listed file exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "synapse_acme"


def _section() -> str:
    text = (ROOT / "docs" / "how-it-works.md").read_text()
    start = text.index("## Where things live")
    return text[start : text.index("\n## ", start + 1)]


def test_every_module_is_listed_and_every_listed_file_exists() -> None:
    listed = set(re.findall(r"`([\w/]+\.py)`", _section())) - {"tests/unit/test_docs_map.py"}
    modules = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert modules - listed == set(), "modules missing from 'Where things live'"
    assert listed - modules == set(), "'Where things live' names files that do not exist"
    assert len(listed) > 30
