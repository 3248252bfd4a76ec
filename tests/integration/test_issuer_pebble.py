"""The real client (transport + client + issuer + HTTP-01 resource) against a real Pebble.

The reactor runs in a subprocess (tests/integration/issue_script.py); these tests check what it
printed: chains that verify against Pebble's root, keys that match, typed errors.
"""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from synapse_acme import crypto
from synapse_acme.model import CertificateBundle
from synapse_acme.testing.pebble import PebbleCA

SCRIPT = Path(__file__).with_name("issue_script.py")


def run_issuance(
    ca: PebbleCA, groups: Sequence[Sequence[str]], *extra: str, timeout: float = 120
) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--directory",
        ca.directory_url,
        "--ca-bundle",
        ca.ca_bundle,
        "--issuer-roots",
        ca.issuer_roots,
        "--http-port",
        str(ca.http_port),
        *extra,
    ]
    for names in groups:
        cmd += ["--names", ",".join(names)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(groups), (proc.stdout[-2000:], proc.stderr[-3000:])
    return lines


def check_issued(ca: PebbleCA, outcome: dict[str, Any], names: Sequence[str]) -> None:
    assert outcome["ok"], outcome
    chain = outcome["chain_pem"].encode()
    ca.verify_chain(chain, names)
    bundle = CertificateBundle(key_pem=outcome["key_pem"].encode(), chain_pem=chain)
    now = datetime.datetime.now(datetime.timezone.utc)
    crypto.validate_bundle(bundle, list(names), now)  # key matches leaf, chain in order
    md = outcome["metadata"]
    assert md["names"] == list(names)
    assert md["issuer_directory"] == ca.directory_url
    assert md["certificate_url"].startswith("https://127.0.0.1:")


def test_issue_one_certificate(pebble: PebbleCA) -> None:
    [outcome] = run_issuance(pebble, [["a.example.test"]])
    check_issued(pebble, outcome, ["a.example.test"])


def test_issue_ten_names(pebble: PebbleCA) -> None:
    names = [f"n{i}.example.test" for i in range(10)]
    [outcome] = run_issuance(pebble, [names])
    check_issued(pebble, outcome, names)


def test_bad_nonce_storm_five_issuances(pebble_factory: Callable[..., PebbleCA]) -> None:
    ca = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "50"})
    groups = [[f"storm{i}.example.test"] for i in range(5)]
    outcomes = run_issuance(ca, groups)
    for names, outcome in zip(groups, outcomes, strict=True):
        check_issued(ca, outcome, names)
    # Half of all good nonces were refused: the retries really happened, and all were absorbed.
    assert outcomes[0]["bad_nonce_retries"] >= 5, outcomes[0]["bad_nonce_retries"]


def test_rejected_identifier(pebble_factory: Callable[..., PebbleCA]) -> None:
    ca = pebble_factory(blocklist=["blocked.example.test"])
    [outcome] = run_issuance(ca, [["blocked.example.test"]])
    assert not outcome["ok"]
    assert (outcome["error"], outcome["code"]) == ("AcmeError", "rejectedIdentifier"), outcome


def test_external_account_binding(pebble_factory: Callable[..., PebbleCA]) -> None:
    hmac = base64.urlsafe_b64encode(b"synapse-acme-eab-test-key-32byte").decode().rstrip("=")
    ca = pebble_factory(eab={"kid-1": hmac})
    [refused] = run_issuance(ca, [["eab.example.test"]])
    assert (refused["error"], refused["message"].split(":")[0]) == ("ConfigError", "acme.eab")
    [outcome] = run_issuance(ca, [["eab.example.test"]], "--eab-kid", "kid-1", "--eab-hmac", hmac)
    check_issued(ca, outcome, ["eab.example.test"])
