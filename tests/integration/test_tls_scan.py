"""Scan a real HotSwapTLS listener with Debian's ``sslscan``: modern settings only.

Both an RSA and an ECDSA certificate are served (picked by SNI), so both cipher families are
scanned. Fails (does not skip) when ``sslscan`` is missing: CI installs it.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.certs import TestCA
from tests.integration.test_tls_rotation import Server

pytestmark = pytest.mark.integration

AEAD = ("GCM", "CHACHA20", "POLY1305", "CCM")
# sslscan names TLS 1.3 suites by their IANA names; all of them are AEAD with (EC)DHE.
TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
GOOD_GROUPS = {"x25519", "secp256r1", "secp384r1", "x25519mlkem768"}


def scan(port: int, sni: str) -> ET.Element:
    sslscan = shutil.which("sslscan")
    assert sslscan is not None, "sslscan is not installed (apt-get install sslscan)"
    out = subprocess.run(
        [sslscan, "--xml=-", "--no-colour", f"--sni-name={sni}", f"127.0.0.1:{port}"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    root = ET.fromstring(out[out.index(b"<?xml") :])
    test = root.find("ssltest")
    assert test is not None, out.decode(errors="replace")
    return test


@pytest.mark.parametrize(
    ("sni", "kx_auth"), [("rsa.example.test", "ECDHE-RSA-"), ("ec.example.test", "ECDHE-ECDSA-")]
)
def test_sslscan_only_tls12_13_aead_forward_secret(tmp_path: Path, sni: str, kx_auth: str) -> None:
    ca = TestCA()
    args = []
    for name, key_type in (("rsa", "rsa-2048"), ("ec", "ecdsa-p256")):
        bundle = ca.issue([f"{name}.example.test"], key_type=key_type)
        (tmp_path / f"{name}.crt").write_bytes(bundle.chain_pem)
        (tmp_path / f"{name}.key").write_bytes(bundle.key_pem)
        args += ["--pair", name, str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key")]
    server = Server([*args, "--default", "rsa"], tmp_path / "server.log")
    try:
        result = scan(server.port, sni)
    finally:
        server.close()

    enabled = {
        (p.get("type"), p.get("version"))
        for p in result.iter("protocol")
        if p.get("enabled") == "1"
    }
    assert enabled == {("tls", "1.2"), ("tls", "1.3")}

    ciphers = [c for c in result.iter("cipher") if c.get("status") in ("accepted", "preferred")]
    assert ciphers, "sslscan found no accepted cipher"
    tls12 = {c.get("cipher") for c in ciphers if c.get("sslversion") == "TLSv1.2"}
    tls13 = {c.get("cipher") for c in ciphers if c.get("sslversion") == "TLSv1.3"}
    assert tls13 and tls13 <= TLS13
    assert tls12, "no TLS 1.2 suite accepted"
    for suite in tls12:
        assert suite is not None
        assert suite.startswith(kx_auth), f"{suite}: not ECDHE with the certificate's key type"
        assert any(mode in suite for mode in AEAD), f"{suite}: not AEAD"
    assert {c.get("sslversion") for c in ciphers} == {"TLSv1.2", "TLSv1.3"}

    groups = {g.get("name", "").split()[0].lower() for g in result.iter("group")}
    assert groups and groups <= GOOD_GROUPS, f"unexpected key exchange groups: {groups}"

    reneg = result.find("renegotiation")
    assert reneg is not None and reneg.get("supported") == "0"
    [cert] = result.iter("certificate")
    assert sni in (cert.findtext("altnames") or "")  # SNI picked the right certificate
