"""The check that an issued chain reaches a trusted root (synapse_acme.acme.trust)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.name import _ASN1Type

from synapse_acme import crypto
from synapse_acme.acme.trust import IssuerTrust, is_root, load_issuer_trust, load_pem_certificates
from synapse_acme.errors import BundleError, ConfigError
from tests.certs import TestCA

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ["matrix.example.test", "*.example.test"]


def _chain(pem: bytes) -> list[x509.Certificate]:
    return crypto.parse_chain(pem)


@pytest.fixture
def ca() -> TestCA:
    return TestCA(now=NOW)


def test_a_complete_chain_to_a_configured_root_passes(ca: TestCA) -> None:
    trust = IssuerTrust((ca.root,), ("issuer_roots",))
    chain = _chain(ca.issue(NAMES).chain_pem)
    for name in NAMES:  # a wildcard is checked through a name it covers
        trust.check(chain, name, NOW)


def test_a_leaf_without_its_intermediate_is_refused(ca: TestCA) -> None:
    trust = IssuerTrust((ca.root,), ("issuer_roots x.pem",))
    leaf_only = _chain(ca.issue(NAMES).chain_pem)[:1]
    with pytest.raises(BundleError, match=r"does not reach a trusted root \(issuer_roots x\.pem\)"):
        trust.check(leaf_only, NAMES[0], NOW)
    with pytest.raises(BundleError, match="without any intermediate"):
        trust.check(leaf_only, NAMES[0], NOW)


def test_an_unknown_root_is_refused(ca: TestCA) -> None:
    other = TestCA(now=NOW, name="Other")
    trust = IssuerTrust((other.root,), ("issuer_roots",))
    with pytest.raises(BundleError, match="does not reach a trusted root"):
        trust.check(_chain(ca.issue(NAMES).chain_pem), NAMES[0], NOW)


def test_a_configured_intermediate_is_no_root(ca: TestCA) -> None:
    # Only a self-signed root anchors a chain: naming the intermediate does not excuse a
    # chain served without it (clients that only know the root would fail).
    trust = IssuerTrust((ca.root, ca.intermediate), ("issuer_roots",))
    leaf_only = _chain(ca.issue(NAMES).chain_pem)[:1]
    with pytest.raises(BundleError, match="without any intermediate"):
        trust.check(leaf_only, NAMES[0], NOW)
    with pytest.raises(ValueError, match="at least one root"):
        IssuerTrust((ca.intermediate,), ())


def test_an_issuer_roots_file_of_intermediates_only_is_refused(ca: TestCA, tmp_path: Path) -> None:
    path = tmp_path / "intermediate.pem"
    path.write_bytes(ca.intermediate_pem)
    with pytest.raises(ConfigError, match=r"^acme\.issuer_roots: expected the CA's root"):
        load_issuer_trust([("acme.issuer_roots", str(path))], use_system=False)


def test_the_time_of_the_check_is_the_clocks(ca: TestCA) -> None:
    trust = IssuerTrust((ca.root,), ())
    chain = _chain(ca.issue(NAMES, not_after=NOW + datetime.timedelta(days=1)).chain_pem)
    trust.check(chain, NAMES[0], NOW)
    with pytest.raises(BundleError):
        trust.check(chain, NAMES[0], NOW + datetime.timedelta(days=2))


def test_a_name_the_leaf_does_not_cover_fails(ca: TestCA) -> None:
    trust = IssuerTrust((ca.root,), ())
    with pytest.raises(BundleError):
        trust.check(_chain(ca.issue(NAMES).chain_pem), "other.test", NOW)


def test_no_roots_at_all_is_an_error() -> None:
    with pytest.raises(ValueError):
        IssuerTrust((), ())


def test_load_reads_the_system_store_and_the_configured_files(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "system.pem"
    other = TestCA(now=NOW, name="System")
    system.write_bytes(b"junk before\n" + other.root_pem + b"\nnot a certificate\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(system))
    roots = tmp_path / "roots.pem"
    roots.write_bytes(ca.root_pem)
    trust = load_issuer_trust([("acme.issuer_roots", str(roots))])
    assert {c.subject for c in trust.roots} == {other.root.subject, ca.root.subject}
    assert trust.sources == (f"the system trust store {system}", f"acme.issuer_roots {roots}")
    trust.check(_chain(ca.issue(NAMES).chain_pem), NAMES[0], NOW)
    # Without the system store, only the configured roots count.
    only = load_issuer_trust([("acme.issuer_roots", str(roots))], use_system=False)
    assert [c.subject for c in only.roots] == [ca.root.subject]


def test_load_names_the_key_of_a_bad_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    with pytest.raises(ConfigError, match=r"^acme\.issuer_roots: expected a PEM file"):
        load_issuer_trust([("acme.issuer_roots", str(empty))], use_system=False)
    with pytest.raises(ConfigError, match=r"^acme\.issuer_roots: cannot read"):
        load_issuer_trust([("acme.issuer_roots", str(tmp_path))], use_system=False)


def test_load_with_no_root_anywhere_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="install ca-certificates"):
        load_issuer_trust([])


def test_the_real_system_store_loads() -> None:
    # The machine's own trust store (ca-certificates): well over a handful of roots, none of
    # which raises or warns on load.
    found = load_issuer_trust([]).roots
    assert len(found) > 20
    assert os.path.exists("/etc/ssl/certs/ca-certificates.crt")


def test_pem_parsing_skips_what_is_not_a_certificate(ca: TestCA) -> None:
    data = ca.root_pem + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert [c.subject for c in load_pem_certificates(data + ca.intermediate_pem)] == [
        ca.root.subject,
        ca.intermediate.subject,
    ]


def _self_issued(subject: x509.Name, issuer: x509.Name) -> x509.Certificate:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2030, 1, 1))
        .sign(key, hashes.SHA256())
    )


def test_is_root_compares_names_fast_and_falls_back_to_parsed_names(ca: TestCA) -> None:
    from cryptography.x509.oid import NameOID

    from synapse_acme.acme.trust import _raw_issuer_and_subject

    def cn(value: str, kind: _ASN1Type | None = None) -> x509.Name:
        if kind is None:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, kind)])

    root = _self_issued(cn("root"), cn("root"))
    issued = _self_issued(cn("leaf"), cn("root"))
    assert _raw_issuer_and_subject(issued.tbs_certificate_bytes) == (
        cn("root").public_bytes(),
        cn("leaf").public_bytes(),
    )
    assert is_root(root) and not is_root(issued)
    # The same name in two string encodings: not byte-equal, still the same name.
    mixed = _self_issued(cn("root", _ASN1Type.PrintableString), cn("root", _ASN1Type.UTF8String))
    raw = _raw_issuer_and_subject(mixed.tbs_certificate_bytes)
    assert raw is not None and raw[0] != raw[1]
    assert is_root(mixed) == (mixed.subject == mixed.issuer)
    # And every certificate of the test CA is judged as the parsed Names judge it.
    for cert in _chain(ca.root_pem) + _chain(ca.intermediate_pem):
        assert is_root(cert) == (cert.subject == cert.issuer)
    assert _raw_issuer_and_subject(b"\x30\x05\x02") is None  # garbage: the slow path


def test_pem_parsing_reads_a_whole_bundle_and_keeps_to_certificate_blocks(ca: TestCA) -> None:
    key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    both = load_pem_certificates(ca.root_pem + key + ca.intermediate_pem)
    assert [c.subject for c in both] == [ca.root.subject, ca.intermediate.subject]
    # A label the block reader does not take is left out, as before.
    other = ca.root_pem.replace(b"CERTIFICATE", b"X509 CERTIFICATE")
    assert [c.subject for c in load_pem_certificates(other + ca.intermediate_pem)] == [
        ca.intermediate.subject
    ]
    assert load_pem_certificates(b"") == [] and load_pem_certificates(b"not PEM") == []
