"""External Account Binding and CA fallback against real Pebbles, through the real CLI.

EAB: a Pebble with ``externalAccountBindingRequired`` and ``externalAccountMACKeys`` issues to
the right kid and HMAC key; a wrong key, an unknown kid or no binding at all fail with an
error naming ``acme.eab`` and the CA's problem type, and never echo the key.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

from synapse_acme.testing.pebble import PebbleCA
from tests.faults.cli_harness import CLI, check_valid, run

QUICK = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_eab_right_keys_issue_and_wrong_ones_name_acme_eab(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    key = _b64(os.urandom(32))
    wrong_key = _b64(os.urandom(32))
    ca = pebble_factory(eab={"kid-1": key}, env=QUICK)
    names = ["eab.example.test"]
    cases = {
        "wrong-key": ({"kid": "kid-1", "hmac_key": wrong_key}, "unauthorized", "kid-1"),
        "wrong-kid": ({"kid": "kid-2", "hmac_key": key}, "unauthorized", "kid-2"),
        "missing": (None, "requires external account binding", None),
    }
    for label, (eab, problem, kid) in cases.items():
        work = tmp_path / label
        work.mkdir()
        extra = {"eab": eab} if eab is not None else {}
        cfg = ca.write_acme_config(work, names, **extra)
        r = run([*CLI, "issue", "-c", str(cfg)])
        assert r.returncode == 1, (label, r.stdout, r.stderr[-2000:])
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("FAILED")]
        assert len(lines) == 1, (label, r.stdout, r.stderr[-2000:])
        failed = lines[0]
        assert "acme.eab:" in failed, (label, failed)
        assert problem in failed, (label, failed)
        if kid is not None:
            assert f"kid {kid!r}" in failed, (label, failed)
        for secret in (key, wrong_key):
            assert secret not in r.stdout + r.stderr, label
        assert not (work / "store" / "certificates" / "eab.example.test").exists()
    work = tmp_path / "right"
    work.mkdir()
    cfg = ca.write_acme_config(work, names, eab={"kid": "kid-1", "hmac_key": key})
    r = run([*CLI, "issue", "-c", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert key not in r.stdout + r.stderr
    check_valid(ca, work / "store", names)
