"""mypy, with the zope plugin, fails when an implementation drifts from its interface.

The interfaces in ``synapse_acme/interfaces.py`` are annotated, so every ``@implementer`` class
is type-checked against them by ``mypy`` (scripts/test.sh). This runs mypy, with the project's
configuration, on three small implementations written here: one faithful, one whose signatures
drifted, one missing a method. Only the last two may fail, and with the expected errors.

Outside tests/unit on purpose: it needs mypy, a development tool, which the version matrix
(scripts/test-versions.sh, runtime dependencies only) does not install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAITHFUL = """
from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from synapse_acme.interfaces import IIssuanceLock


@implementer(IIssuanceLock)
class Faithful:
    def acquire(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        return defer.succeed(True)

    def renew(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        return defer.succeed(True)

    def release(self, name: str, holder: str) -> defer.Deferred[None]:
        return defer.succeed(None)


lock: IIssuanceLock = Faithful()
"""

DRIFTED = """
from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from synapse_acme.interfaces import IIssuanceLock


@implementer(IIssuanceLock)
class Drifted:
    def acquire(self, name: str, holder: str) -> defer.Deferred[bool]:  # lease_seconds lost
        return defer.succeed(True)

    def renew(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[None]:
        return defer.succeed(None)  # fires with None instead of bool

    def release(self, name: bytes, holder: str) -> defer.Deferred[None]:  # bytes, not str
        return defer.succeed(None)
"""

MISSING = """
from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from synapse_acme.interfaces import IChallengeStore


@implementer(IChallengeStore)
class Partial:
    def put_challenge(self, token: str, key_authorization: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def get_challenge(self, token: str) -> defer.Deferred[str | None]:
        return defer.succeed(None)


store: IChallengeStore = Partial()
"""


def test_mypy_fails_when_an_implementation_drifts(tmp_path: Path) -> None:
    for name, text in (("faithful", FAITHFUL), ("drifted", DRIFTED), ("missing", MISSING)):
        (tmp_path / f"{name}.py").write_text(text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports=silent",
            "faithful.py",
            "drifted.py",
            "missing.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(REPO)},  # this checkout's interfaces
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("faithful.py")], out
    assert 'Signature of "Drifted" incompatible with "acquire" of supertype "IIssuanceLock"' in out
    assert (
        'Return type "Deferred[None]" of "Drifted" incompatible with return type "Deferred[bool]"'
        ' in "renew" of supertype "IIssuanceLock"'
    ) in out
    assert 'Argument 1 of "Drifted" is incompatible with "release"' in out
    assert (
        "'Partial' is missing following 'IChallengeStore' interface members: remove_challenge"
        in (out)
    )
    assert len(errors) == 4, out
