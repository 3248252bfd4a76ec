"""The ACME account key file: created once and privately, old Synapse RSA files still work."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import josepy
import pytest
from acme import jws
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from synapse_acme import crypto, fsutil
from synapse_acme.account import jwk_from_pem, load_or_create_account_key, parse_account_key
from synapse_acme.errors import StoreError


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _pem(key: object, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)  # type: ignore[attr-defined]


def test_creates_es256_key_0600_and_reuses_it(tmp_path: Path) -> None:
    path = tmp_path / "acme" / "account.key"
    old_umask = os.umask(0o022)
    try:
        jwk = load_or_create_account_key(str(path))
    finally:
        os.umask(old_umask)
    assert isinstance(jwk, josepy.JWKEC)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # the same key next time (the CA account is bound to it)
    again = load_or_create_account_key(str(path))
    assert again.thumbprint() == jwk.thumbprint()
    # no temporary files left behind
    assert os.listdir(path.parent) == ["account.key"]


def test_created_key_signs_acme_jws(tmp_path: Path) -> None:
    jwk = load_or_create_account_key(str(tmp_path / "account.key"))
    signed = jws.JWS.sign(
        b"{}", key=jwk, alg=josepy.ES256, nonce=b"nonce", url="https://ca.test/new-acct"
    )
    assert signed.verify(jwk.public_key())


@pytest.mark.parametrize("key_type", ["rsa-2048", "ecdsa-p384"])
def test_key_type_for_new_keys(tmp_path: Path, key_type: str) -> None:
    jwk = load_or_create_account_key(str(tmp_path / "k"), key_type)
    expected = josepy.JWKRSA if key_type.startswith("rsa") else josepy.JWKEC
    assert isinstance(jwk, expected)


def test_key_type_ignored_for_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = load_or_create_account_key(str(path), "ecdsa-p256")
    second = load_or_create_account_key(str(path), "rsa-2048")
    assert isinstance(second, josepy.JWKEC)
    assert second.thumbprint() == first.thumbprint()


def test_old_synapse_rsa_pem_keeps_working(tmp_path: Path) -> None:
    """txacme/Synapse wrote RSA keys (PKCS#1 'RSA PRIVATE KEY' or PKCS#8): load, never rewrite."""
    formats = [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8]
    for i, fmt in enumerate(formats):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path = tmp_path / f"acme_account.key.{i}"
        pem = _pem(key, fmt)
        path.write_bytes(pem)
        os.chmod(path, 0o600)
        jwk = load_or_create_account_key(str(path))
        assert isinstance(jwk, josepy.JWKRSA)
        assert jwk.thumbprint() == josepy.JWKRSA(key=key.public_key()).thumbprint()
        assert path.read_bytes() == pem  # untouched


def test_ec_sec1_pem_loads(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "k"
    path.write_bytes(_pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    os.chmod(path, 0o600)
    jwk = load_or_create_account_key(str(path))
    assert isinstance(jwk, josepy.JWKEC)


def test_certbot_jwk_json_loads(tmp_path: Path) -> None:
    original = jwk_from_pem(crypto.generate_private_key_pem("rsa-2048"))
    path = tmp_path / "private_key.json"
    path.write_text(original.json_dumps())
    os.chmod(path, 0o600)
    assert load_or_create_account_key(str(path)).thumbprint() == original.thumbprint()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "not a PEM private key"),
        (b"hello, world", "not a PEM private key"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "not a PEM"),
        (b'{"kty": "oct", "k": "c2VjcmV0"}', "no RSA or ECDSA private key"),
        (b"{broken json", "not a PEM private key or JWK"),
    ],
)
def test_refuses_files_that_are_not_keys(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "account.key"
    path.write_bytes(content)
    with pytest.raises(StoreError) as e:
        load_or_create_account_key(str(path))
    assert str(path) in str(e.value) and why in str(e.value)
    assert path.read_bytes() == content  # never replaced by a fresh key


def test_refuses_public_key_encrypted_key_and_ed25519(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encrypted = _pem(ec_key, serialization.PrivateFormat.PKCS8, b"secret-pass")
    edkey = _pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8)
    for name, data, why in [
        ("pub", public, "not a PEM private key"),
        ("enc", encrypted, "encrypted"),
        ("ed", edkey, "expected an RSA or ECDSA"),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(StoreError) as e:
            load_or_create_account_key(str(path))
        assert str(path) in str(e.value) and why in str(e.value)


def test_error_never_contains_key_material(tmp_path: Path) -> None:
    pem = crypto.generate_private_key_pem()
    broken = pem.replace(b"-----END PRIVATE KEY-----", b"")  # truncated but full of key bytes
    path = tmp_path / "k"
    path.write_bytes(broken)
    with pytest.raises(StoreError) as e:
        load_or_create_account_key(str(path))
    body = b"".join(pem.splitlines()[1:-1]).decode()
    assert body[:20] not in str(e.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        load_or_create_account_key(str(tmp_path))


def test_loose_mode_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "k"
    load_or_create_account_key(str(path))
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="synapse_acme.account"):
        load_or_create_account_key(str(path))
    assert "looser than 0600" in caplog.text and str(path) in caplog.text


def test_small_rsa_key_is_warned_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "k"
    path.write_bytes(_pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="synapse_acme.account"):
        jwk = load_or_create_account_key(str(path))
    assert isinstance(jwk, josepy.JWKRSA)
    assert "RSA-1024" in caplog.text


def test_concurrent_creator_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process creates the file between our check and our write, use its key."""
    path = tmp_path / "k"
    theirs = crypto.generate_private_key_pem()
    real_create = fsutil.create_exclusive

    def race(p: str, data: bytes, mode: int = 0o600) -> bool:
        real_create(p, theirs, mode)  # the other process
        return real_create(p, data, mode)

    monkeypatch.setattr(fsutil, "create_exclusive", race)
    jwk = load_or_create_account_key(str(path))
    assert jwk.thumbprint() == jwk_from_pem(theirs).thumbprint()
    assert path.read_bytes() == theirs


def test_create_exclusive_and_atomic_write_primitives(tmp_path: Path) -> None:
    p = tmp_path / "f"
    assert fsutil.create_exclusive(str(p), b"one", 0o600)
    assert not fsutil.create_exclusive(str(p), b"two", 0o600)
    assert p.read_bytes() == b"one"
    fsutil.atomic_write(str(p), b"three", 0o644)
    assert p.read_bytes() == b"three" and _mode(p) == 0o644
    assert os.listdir(tmp_path) == ["f"]


def test_parse_account_key_round_trip() -> None:
    pem = crypto.generate_private_key_pem("ecdsa-p256")
    assert parse_account_key(pem, "x").thumbprint() == jwk_from_pem(pem).thumbprint()
