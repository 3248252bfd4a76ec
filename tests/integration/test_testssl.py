"""Debian's ``testssl.sh`` against a real HotSwapTLS listener with the caps of ``synapse-acme run``.

Every finding testssl rates LOW or worse must be one of the few expected below, each with its
reason; anything else fails the test. Fails (never skips) when ``testssl`` is missing: CI
installs it (scripts/install-deps.sh).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.certs import TestCA
from tests.integration.test_tls_rotation import Server

pytestmark = pytest.mark.integration

NAME = "ec.example.test"
#: Findings that are expected on a loopback test listener, with why they are not a problem.
EXPECTED = {
    # The offered suites are all AEAD with forward secrecy; like Mozilla's "intermediate"
    # profile, the client picks (it knows whether it has AES hardware).
    "cipher_order",
    # Signed by a test CA that testssl does not trust: about the test, not the server.
    "cert_chain_of_trust",
    # The test CA publishes no CRL/OCSP (and Let's Encrypt switched OCSP off in 2025).
    "cert_revocation",
    "DNS_CAArecord",  # the test name has no DNS
}
BAD = {"LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN"}


def _testssl(port: int, out: Path) -> list[dict[str, Any]]:
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    assert testssl, "testssl is not installed (apt-get install testssl.sh)"
    out.unlink(missing_ok=True)
    subprocess.run(
        [
            testssl,
            "-p",
            "-S",
            "-P",
            "-U",
            "-s",
            "-f",
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--sneaky",
            "--ip",
            "127.0.0.1",  # connect there, with the test name as SNI (no DNS needed)
            "--jsonfile",
            str(out),
            f"{NAME}:{port}",
        ],
        capture_output=True,
        timeout=300,
        check=False,
        # NO_ENGINE: testssl would otherwise try to load OpenSSL's GOST engine into its own
        # openssl and report "engine_problem WARN" where the machine lacks it. That is about the
        # scanner, not the server (which offers no GOST suites), so the engine is not loaded.
        env={"PATH": "/usr/bin:/bin", "HOME": str(out.parent), "NO_ENGINE": "true"},
    )
    findings = json.loads(out.read_text())
    assert isinstance(findings, list) and findings
    return findings


def test_testssl_findings(tmp_path: Path) -> None:
    ca = TestCA()
    bundle = ca.issue([NAME])
    (tmp_path / "ec.crt").write_bytes(bundle.chain_pem)
    (tmp_path / "ec.key").write_bytes(bundle.key_pem)
    server = Server(
        ["--pair", "ec", str(tmp_path / "ec.crt"), str(tmp_path / "ec.key"), "--default", "ec"],
        tmp_path / "server.log",
    )
    try:
        findings = _testssl(server.port, tmp_path / "testssl.json")
        # A loaded machine sometimes makes one of testssl's own openssl calls time out; such a
        # finding says "connect problem" and says nothing about the server: scan once more.
        if any("connect problem" in f.get("finding", "") for f in findings):
            findings = _testssl(server.port, tmp_path / "testssl.json")
    finally:
        server.close()
    by_id = {f["id"]: f for f in findings}
    unexpected = [
        f"{f['id']} {f['severity']}: {f['finding']}"
        for f in findings
        if f["severity"] in BAD and f["id"] not in EXPECTED
    ]
    assert not unexpected, unexpected
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert by_id[old]["finding"] == "not offered", by_id[old]
    assert by_id["TLS1_2"]["finding"] == "offered"
    assert by_id["TLS1_3"]["finding"].startswith("offered")
    # No session resumption (docs/how-it-works.md, "TLS sessions").
    # testssl words it "not supported", or "No Session ID, no resumption" when the server
    # hands out no session ID at all.
    for check in ("sessionresumption_ticket", "sessionresumption_ID"):
        finding = by_id[check]["finding"].lower()
        assert "not supported" in finding or "no resumption" in finding, by_id[check]
    # testssl's vulnerability checks ran and found nothing (heartbleed, ROBOT, ...).
    assert by_id["heartbleed"]["severity"] == "OK" and by_id["ROBOT"]["severity"] == "OK"
