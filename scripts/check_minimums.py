"""Check that the declared minimums and constraints/minimum.txt agree, and are what is installed.

    python scripts/check_minimums.py constraints/minimum.txt OLDEST_PYTHON

Run by scripts/test-versions.sh with the interpreter of a venv that has synapse-acme installed
with ``-c constraints/minimum.txt``. Fails (exit 1, one line per problem) when

- a runtime requirement of the installed synapse-acme has no pin, or a pin no requirement;
- a pin differs from the requirement's ``>=`` bound (raise both together);
- the installed release of a dependency is not the pinned one;
- ``Requires-Python`` is not ``>=OLDEST_PYTHON`` (the oldest interpreter the matrix tests).

The installed metadata is what pip saw, so this checks what users get, not setup.py's text.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, metadata, requires, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

DIST = "synapse-acme"


def pinned(path: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            specs = list(req.specifier)
            if len(specs) != 1 or specs[0].operator != "==":
                raise SystemExit(f"{path}: {line!r} is not a single `name==version` pin")
            pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def declared() -> dict[str, Version | None]:
    lows: dict[str, Version | None] = {}
    for text in requires(DIST) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement (dev, synapse): not a runtime dependency
        bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
        lows[canonicalize_name(req.name)] = bounds[0] if bounds else None
    return lows


def main(constraints: str, oldest_python: str) -> int:
    pins, lows = pinned(constraints), declared()
    problems = []
    for name in sorted(pins.keys() | lows.keys()):
        pin, low = pins.get(name), lows.get(name)
        if low is None and name in lows:
            problems.append(f"{name}: setup.py declares no `>=` bound")
        elif pin is None:
            problems.append(f"{name}: setup.py requires >={low}, {constraints} has no pin")
        elif low is None:
            problems.append(f"{name}: {constraints} pins {pin}, setup.py does not require it")
        elif pin != low:
            problems.append(f"{name}: setup.py requires >={low}, {constraints} pins {pin}")
        else:
            try:
                installed = Version(version(name))
            except PackageNotFoundError:
                problems.append(f"{name}: not installed")
                continue
            if installed != pin:
                problems.append(f"{name}: {installed} is installed, {pin} is pinned")
    requires_python = metadata(DIST)["Requires-Python"]
    if requires_python != f">={oldest_python}":
        problems.append(
            f"Requires-Python is {requires_python!r}, the matrix's oldest Python is {oldest_python}"
        )
    for problem in problems:
        print(f"check_minimums: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_minimums: {len(pins)} runtime dependencies at their declared minimums")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
