"""The ACME account key file: created once and privately, old Synapse RSA files still work."""

from __future__ import annotations

import json
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
from synapse_acme.account import (
    ACCOUNT_RECORD_FILE,
    AccountRecord,
    AccountRecorder,
    jwk_from_pem,
    key_thumbprint,
    load_or_create_account_key,
    parse_account_key,
    read_account_record,
    start_new_account,
)
from synapse_acme.errors import StoreError
from tests.hang import deadline


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


# -- never a silent new account -------------------------------------------------------------


def _store_with_account(tmp_path: Path) -> tuple[Path, Path, josepy.JWK]:
    """A store whose account was registered: key file and account.json, as a run leaves them."""
    storage = tmp_path / "store"
    key_path = storage / "account.key"
    jwk = load_or_create_account_key(str(key_path), storage=str(storage))
    recorder = AccountRecorder(str(storage), "https://ca.test/dir", key_thumbprint(jwk))
    recorder("https://ca.test/acct/1")
    return storage, key_path, jwk


def test_fresh_store_creates_a_key_quietly(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    storage.mkdir()
    key_path = storage / "account.key"
    jwk = load_or_create_account_key(str(key_path), storage=str(storage))
    assert key_path.exists() and _mode(key_path) == 0o600
    assert load_or_create_account_key(str(key_path), storage=str(storage)) == jwk
    assert not (storage / ACCOUNT_RECORD_FILE).exists()  # only the CA's answer makes a record


def test_recorder_writes_the_record_once_per_change(tmp_path: Path) -> None:
    storage, _, jwk = _store_with_account(tmp_path)
    record_file = storage / ACCOUNT_RECORD_FILE
    assert read_account_record(str(storage)) == AccountRecord(
        url="https://ca.test/acct/1",
        directory="https://ca.test/dir",
        thumbprint=key_thumbprint(jwk),
    )
    assert _mode(record_file) == 0o600
    assert b"PRIVATE" not in record_file.read_bytes()
    before = record_file.stat().st_ino
    AccountRecorder(str(storage), "https://ca.test/dir", key_thumbprint(jwk))(
        "https://ca.test/acct/1"
    )
    assert record_file.stat().st_ino == before  # unchanged: not rewritten
    AccountRecorder(str(storage), "https://ca.test/dir", key_thumbprint(jwk))(
        "https://ca.test/acct/2"
    )
    assert read_account_record(str(storage)).url == "https://ca.test/acct/2"  # type: ignore[union-attr]


def test_deleted_key_with_an_account_record_is_refused(tmp_path: Path) -> None:
    storage, key_path, _ = _store_with_account(tmp_path)
    key_path.unlink()
    with pytest.raises(StoreError) as err:
        load_or_create_account_key(str(key_path), storage=str(storage))
    message = str(err.value)
    assert f"the ACME account key {key_path} is missing" in message
    assert f"{storage / ACCOUNT_RECORD_FILE} records the account https://ca.test/acct/1" in message
    assert "synapse-acme new-account -c" in message
    assert not key_path.exists()  # no new key written
    assert sorted(os.listdir(storage)) == [ACCOUNT_RECORD_FILE]


def _issued_store(storage: Path, placeholder: bool = False) -> None:
    entry = storage / "certificates" / "a.example"
    entry.mkdir(parents=True)
    (entry / "metadata.json").write_text(json.dumps({"placeholder": placeholder}))


def test_deleted_key_in_an_older_store_with_certificates_is_refused(tmp_path: Path) -> None:
    """A store from before account.json existed: its certificates are the evidence."""
    storage = tmp_path / "store"
    _issued_store(storage)
    key_path = storage / "account.key"
    with pytest.raises(StoreError) as err:
        load_or_create_account_key(str(key_path), storage=str(storage))
    assert f"{storage / 'certificates'} holds certificates issued to the account" in str(err.value)
    assert "a.example" in str(err.value) and "new-account" in str(err.value)
    assert not key_path.exists()


def test_a_placeholder_is_no_evidence_of_an_account(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    _issued_store(storage, placeholder=True)
    load_or_create_account_key(str(storage / "account.key"), storage=str(storage))
    assert (storage / "account.key").exists()


def test_unreadable_key_names_the_evidence_and_the_way_out(tmp_path: Path) -> None:
    storage, key_path, _ = _store_with_account(tmp_path)
    key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(StoreError) as err:
        load_or_create_account_key(str(key_path), storage=str(storage))
    message = str(err.value)
    assert f"account key {key_path} is not a PEM private key" in message
    assert "records the account https://ca.test/acct/1" in message
    assert "new-account" in message
    assert key_path.read_bytes() == b"-----BEGIN PRIVATE KEY-----\nAAAA\n"


def test_fifo_as_account_key_is_refused_without_blocking(tmp_path: Path) -> None:
    storage, key_path, _ = _store_with_account(tmp_path)
    key_path.unlink()
    os.mkfifo(key_path)
    with deadline(10), pytest.raises(StoreError) as err:
        load_or_create_account_key(str(key_path), storage=str(storage))
    assert f"{key_path}: it is a FIFO" in str(err.value)


def test_key_swapped_for_a_foreign_one_is_refused(tmp_path: Path) -> None:
    storage, key_path, jwk = _store_with_account(tmp_path)
    key_path.write_bytes(crypto.generate_private_key_pem())  # a valid key, not the account's
    with pytest.raises(StoreError) as err:
        load_or_create_account_key(str(key_path), storage=str(storage))
    message = str(err.value)
    assert f"the account key {key_path} is not the key of the account recorded in" in message
    assert key_thumbprint(jwk) in message and "new-account" in message


def test_symlinked_key_is_followed_to_our_own_regular_file(tmp_path: Path) -> None:
    """Decision: account_key_file is the operator's choice of path and may be a link (to a
    secrets directory); the file at its end must still be a regular file of ours."""
    real = tmp_path / "secrets" / "acme.key"
    jwk = load_or_create_account_key(str(real))
    link = tmp_path / "account.key"
    link.symlink_to(real)
    assert load_or_create_account_key(str(link)).thumbprint() == jwk.thumbprint()
    real.unlink()
    with pytest.raises(StoreError, match=r"is a symbolic link to .*, which does not exist"):
        load_or_create_account_key(str(link))
    assert not real.exists()  # nothing created through the link


def test_key_of_another_user_is_refused_before_it_is_read_or_chmodded(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the test suite runs as root (only root can chown)"
    key_path = tmp_path / "account.key"
    key_path.write_bytes(crypto.generate_private_key_pem())
    os.chmod(key_path, 0o644)
    os.chown(key_path, 65534, 65534)
    with pytest.raises(StoreError) as err:
        load_or_create_account_key(str(key_path))
    assert f"the account key {key_path} belongs to" in str(err.value) and "uid 65534" in str(
        err.value
    )
    assert _mode(key_path) == 0o644 and key_path.stat().st_uid == 65534


# -- new-account ----------------------------------------------------------------------------


def test_new_account_after_a_lost_key(tmp_path: Path) -> None:
    storage, key_path, old = _store_with_account(tmp_path)
    key_path.unlink()
    done = start_new_account(str(key_path), str(storage), "20261101T120000Z")
    assert done.old_key is None
    assert done.old_record == f"{storage / ACCOUNT_RECORD_FILE}.old-20261101T120000Z"
    assert json.loads(Path(done.old_record).read_text())["url"] == "https://ca.test/acct/1"
    jwk = load_or_create_account_key(str(key_path), storage=str(storage))
    assert key_thumbprint(jwk) == done.thumbprint != key_thumbprint(old)
    assert _mode(key_path) == 0o600


def test_new_account_keeps_a_broken_key_beside_the_new_one(tmp_path: Path) -> None:
    storage, key_path, _ = _store_with_account(tmp_path)
    key_path.write_bytes(b"garbage")
    done = start_new_account(str(key_path), str(storage), "20261101T120000Z")
    assert done.old_key == f"{key_path}.broken-20261101T120000Z"
    assert Path(done.old_key).read_bytes() == b"garbage"
    load_or_create_account_key(str(key_path), storage=str(storage))
    # twice in the same second: a second name, never an overwrite
    key_path.write_bytes(b"garbage 2")
    again = start_new_account(str(key_path), str(storage), "20261101T120000Z")
    assert again.old_key == f"{key_path}.broken-20261101T120000Z-2"
    assert Path(done.old_key).read_bytes() == b"garbage"


def test_new_account_moves_a_fifo_aside_without_blocking(tmp_path: Path) -> None:
    storage, key_path, _ = _store_with_account(tmp_path)
    key_path.unlink()
    os.mkfifo(key_path)
    with deadline(10):
        done = start_new_account(str(key_path), str(storage), "T")
    assert done.old_key is not None and stat.S_ISFIFO(os.lstat(done.old_key).st_mode)
    assert stat.S_ISREG(os.lstat(key_path).st_mode)


def test_new_account_replaces_a_foreign_key(tmp_path: Path) -> None:
    storage, key_path, _ = _store_with_account(tmp_path)
    foreign = crypto.generate_private_key_pem()
    key_path.write_bytes(foreign)
    done = start_new_account(str(key_path), str(storage), "T")
    assert done.old_key == f"{key_path}.broken-T" and Path(done.old_key).read_bytes() == foreign
    load_or_create_account_key(str(key_path), storage=str(storage))


def test_new_account_refuses_a_healthy_key_without_force(tmp_path: Path) -> None:
    storage, key_path, jwk = _store_with_account(tmp_path)
    with pytest.raises(StoreError, match=r"is readable and belongs to the account .*--force"):
        start_new_account(str(key_path), str(storage), "T")
    assert load_or_create_account_key(str(key_path), storage=str(storage)) == jwk
    done = start_new_account(str(key_path), str(storage), "T", force=True)
    assert done.old_key == f"{key_path}.replaced-T"
    assert jwk_from_pem(Path(done.old_key).read_bytes()).thumbprint() == jwk.thumbprint()


def test_damaged_record_is_warned_about_and_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage, key_path, jwk = _store_with_account(tmp_path)
    (storage / ACCOUNT_RECORD_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="synapse_acme.account"):
        assert load_or_create_account_key(str(key_path), storage=str(storage)) == jwk
    assert f"the account record {storage / ACCOUNT_RECORD_FILE} is damaged" in caplog.text
    AccountRecorder(str(storage), "https://ca.test/dir", key_thumbprint(jwk))("https://ca.test/a")
    assert read_account_record(str(storage)).url == "https://ca.test/a"  # type: ignore[union-attr]
    # ... and while it is damaged, it still counts as evidence of an account
    (storage / ACCOUNT_RECORD_FILE).write_text("[]")
    key_path.unlink()
    with pytest.raises(StoreError, match="a record of the account, though unreadable"):
        load_or_create_account_key(str(key_path), storage=str(storage))
