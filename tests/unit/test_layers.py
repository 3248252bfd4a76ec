"""The layers of the package, checked on the source: the ACME protocol layer
(``synapse_acme/acme/``) depends on nothing above it, and nothing in the product depends on the
test doubles in ``synapse_acme/testing/``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "synapse_acme"
#: What the ACME layer may import from the package: the base modules and itself.
ACME_MAY_IMPORT = {
    "synapse_acme",  # __version__ only
    "synapse_acme.errors",
    "synapse_acme.model",
    "synapse_acme.names",
    "synapse_acme.crypto",
    "synapse_acme.interfaces",
    "synapse_acme.policy",
    "synapse_acme.fsutil",
}


def _imports(path: Path) -> set[str]:
    """Every synapse_acme module ``path`` imports (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "synapse_acme":
                found |= {f"synapse_acme.{a.name}" for a in node.names if a.name != "__version__"}
                if any(a.name == "__version__" for a in node.names):
                    found.add("synapse_acme")
            elif node.module.startswith("synapse_acme"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("synapse_acme")}
    return found


def test_the_acme_layer_depends_on_nothing_above_it() -> None:
    files = sorted((PACKAGE / "acme").glob("*.py"))
    assert {f.stem for f in files} >= {"transport", "client", "issuer", "trust", "csr", "ari"}
    wrong = {
        f"{f.relative_to(PACKAGE.parent)} imports {m}"
        for f in files
        for m in _imports(f)
        if m not in ACME_MAY_IMPORT and not m.startswith("synapse_acme.acme")
    }
    assert not wrong, sorted(wrong)


def test_the_product_never_imports_the_test_doubles() -> None:
    product = [f for f in PACKAGE.rglob("*.py") if "testing" not in f.relative_to(PACKAGE).parts]
    wrong = {
        f"{f.relative_to(PACKAGE.parent)} imports {m}"
        for f in product
        for m in _imports(f)
        if m.startswith("synapse_acme.testing")
    }
    assert not wrong, sorted(wrong)


def test_the_checker_sees_imports() -> None:
    # The scan is not vacuous: the issuer's own imports are found.
    found = _imports(PACKAGE / "acme" / "issuer.py")
    assert {"synapse_acme.acme.client", "synapse_acme.acme.trust", "synapse_acme.crypto"} <= found
