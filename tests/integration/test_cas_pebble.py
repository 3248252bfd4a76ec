"""External Account Binding and CA fallback against real Pebbles, through the real CLI.

EAB: a Pebble with ``externalAccountBindingRequired`` and ``externalAccountMACKeys`` issues to
the right kid and HMAC key; a wrong key, an unknown kid or no binding at all fail with an
error naming ``acme.eab`` and the CA's problem type, and never echo the key.

CA fallback (``acme.issuers``): two Pebbles, the first stopped, then back.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

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


# -- CA fallback: two Pebbles, the first stopped ---


def _two_ca_config(work: Path, first: PebbleCA, second: PebbleCA, names: list[str]) -> Path:
    """An acme.yaml listing ``first`` then ``second`` under ``issuers``, each with its own
    HTTPS trust and issuing roots. The HTTP-01 listener and the preflight are the second's:
    both Pebbles dial the same http_port (see the test)."""
    cfg = second.write_acme_config(work, names)
    data = yaml.safe_load(cfg.read_text())
    block = data["acme"]
    for key in ("url", "ca_bundle", "issuer_roots"):
        del block[key]
    block["issuers"] = [
        {"url": ca.directory_url, "ca_bundle": ca.ca_bundle, "issuer_roots": ca.issuer_roots}
        for ca in (first, second)
    ]
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def _status(cfg: Path) -> dict[str, Any]:
    r = run([*CLI, "status", "--json", "-c", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    [entry] = json.loads(r.stdout)
    return dict(entry)


def test_ca_fallback_first_pebble_stopped_then_back(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    """The first CA is down: `issue` gets the certificate from the second, the bundle and
    `status` say so (fallbacks: 1), and the second CA's account lives in its own directory.
    The first CA comes back (a restarted Pebble: new ports, new roots, no accounts): a forced
    renewal starts at the first CA again (fallbacks: 0).

    Both Pebbles validate HTTP-01 on one port: the second reserves it (no other test gets
    it), the first is told the same number and only dials it, so nothing races for it."""
    second = pebble_factory(env=QUICK)
    first = pebble_factory(env=QUICK, http_port=second.http_port)
    names = ["fallback.example.test"]
    store = tmp_path / "store"
    first.stop()
    cfg = _two_ca_config(tmp_path, first, second, names)
    r = run([*CLI, "issue", "-c", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "asking the next CA" in r.stderr, r.stderr[-3000:]
    bundle = check_valid(second, store, names)
    assert bundle.metadata["issuer_directory"] == second.directory_url
    assert bundle.metadata["issuer_fallbacks"] == 1
    entry = _status(cfg)
    assert (entry["ca"], entry["fallbacks"]) == (second.directory_url, 1), entry
    written = json.loads((store / "status.json").read_text())[0]
    assert (written["ca_url"], written["fallbacks"]) == (second.directory_url, 1)
    [account_dir] = (store / "accounts").iterdir()
    assert account_dir.name == f"127.0.0.1_{second.api_port}_dir"
    assert (account_dir / "account.key").is_file()
    assert json.loads((account_dir / "account.json").read_text())["directory"] == (
        second.directory_url
    )
    text = run([*CLI, "status", "-c", str(cfg)]).stdout
    assert f"issued by CA: {second.directory_url}" in text and "fallbacks:    1" in text

    first.start()  # back, at new ports and with new roots: the configuration follows it
    cfg = _two_ca_config(tmp_path, first, second, names)
    r = run([*CLI, "renew", "--force", "-c", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "asking the next CA" not in r.stderr
    bundle = check_valid(first, store, names)
    assert (bundle.metadata["issuer_directory"], bundle.metadata["issuer_fallbacks"]) == (
        first.directory_url,
        0,
    )
    entry = _status(cfg)
    assert (entry["ca"], entry["fallbacks"]) == (first.directory_url, 0), entry
    # The first CA's account is the store's own, as before issuers existed.
    assert json.loads((store / "account.json").read_text())["directory"] == first.directory_url
