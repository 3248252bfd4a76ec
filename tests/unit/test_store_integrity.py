"""The store hands out only intact bundles: damaged files on disk are a StoreError naming the
file and the problem, never a certificate that gets served or exported.

Damage is done the way it happens: a file cut short (full disk, crash of a copy, a bad
restore), bytes appended, blocks reordered or dropped by hand, a key from another bundle, and
hostile files (a FIFO, a symlink, a huge file) in place of a store file.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock

from synapse_acme import crypto, store
from synapse_acme.errors import BundleError, StoreError
from synapse_acme.export import FileExporter
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.store import FileStore
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA, leaf_serial
from tests.deferreds import failure_of, result_of
from tests.hang import deadline

KEY = "a.example"
START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)


@functools.cache
def ca() -> TestCA:
    return TestCA(now=START, name="Integrity")


def issued(names: tuple[str, ...] = ("a.example",)) -> CertificateBundle:
    b = ca().issue(list(names))
    return attrs.evolve(b, metadata={"names": list(names)})


def saved(tmp_path: Path, bundle: CertificateBundle | None = None) -> tuple[FileStore, Path]:
    s = FileStore(str(tmp_path / "storage"))
    result_of(s.save(KEY, bundle if bundle is not None else issued()))
    return s, tmp_path / "storage" / "certificates" / KEY


def unreadable(s: FileStore, key: str = KEY) -> str:
    return str(failure_of(s.load(key), StoreError))


def drop_digest(entry: Path) -> None:
    """Make the entry look like one saved before the chain digest existed."""
    meta = json.loads((entry / "metadata.json").read_text())
    del meta[store.CHAIN_DIGEST_FIELD]
    (entry / "metadata.json").write_text(json.dumps(meta))


def blocks(chain_pem: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.PEM) for c in crypto.parse_chain(chain_pem)]


# -- the chain ---------------------------------------------------------------------------------


@pytest.mark.parametrize("digest", [True, False], ids=["with-digest", "older-entry"])
@pytest.mark.parametrize("cut", [200, 40, 10])
def test_truncated_chain_is_unreadable(tmp_path: Path, digest: bool, cut: int) -> None:
    s, entry = saved(tmp_path)
    if not digest:
        drop_digest(entry)
    chain = entry / "fullchain.pem"
    chain.write_bytes(chain.read_bytes()[:-cut])
    err = unreadable(s)
    assert str(chain) in err
    assert "certificate 2 of the chain is incomplete" in err and "truncated" in err


@pytest.mark.parametrize("digest", [True, False], ids=["with-digest", "older-entry"])
@pytest.mark.parametrize(
    "tail",
    [b"garbage\n", b"-----BEGIN CERTIFICATE-----\nMIIB\n", b"\x00\x00\x00\x00"],
    ids=["text", "partial-block", "zeros"],
)
def test_chain_with_bytes_after_it_is_unreadable(tmp_path: Path, digest: bool, tail: bytes) -> None:
    s, entry = saved(tmp_path)
    if not digest:
        drop_digest(entry)
    chain = entry / "fullchain.pem"
    chain.write_bytes(chain.read_bytes() + tail)
    err = unreadable(s)
    assert str(chain) in err and "is damaged" in err
    assert "certificate 3 of the chain is incomplete" in err or "after certificate 2" in err


def test_block_with_damaged_base64_is_unreadable(tmp_path: Path) -> None:
    s, entry = saved(tmp_path)
    drop_digest(entry)
    chain = entry / "fullchain.pem"
    lines = chain.read_bytes().splitlines(keepends=True)
    lines[3] = b"A" * (len(lines[3]) - 1) + b"\n"  # inside the leaf's base64
    chain.write_bytes(b"".join(lines))
    err = unreadable(s)
    assert str(chain) in err and "certificate 1 of the chain" in err


def test_wrong_order_chain_is_unreadable(tmp_path: Path) -> None:
    s, entry = saved(tmp_path)
    drop_digest(entry)  # the structural check alone catches it
    chain = entry / "fullchain.pem"
    leaf, intermediate = blocks(chain.read_bytes())
    chain.write_bytes(intermediate + leaf)
    err = unreadable(s)
    assert str(chain) in err and "chain out of order or incomplete" in err


def test_leaf_followed_by_a_stranger_is_unreadable(tmp_path: Path) -> None:
    """The leaf's real issuer replaced by another CA's intermediate."""
    s, entry = saved(tmp_path)
    drop_digest(entry)
    chain = entry / "fullchain.pem"
    leaf, _ = blocks(chain.read_bytes())
    chain.write_bytes(leaf + TestCA(now=START, name="Other").intermediate_pem)
    err = unreadable(s)
    assert str(chain) in err and "is not signed by the next certificate" in err


def test_chain_that_lost_its_intermediate_is_unreadable(tmp_path: Path) -> None:
    """Cut exactly between two blocks, what is left parses and is signed in order: the digest
    recorded at save time is what tells."""
    s, entry = saved(tmp_path)
    chain = entry / "fullchain.pem"
    leaf, _ = blocks(chain.read_bytes())
    chain.write_bytes(leaf)
    err = unreadable(s)
    assert str(chain) in err and "changed after it was saved" in err


def test_leaf_alone_is_accepted_when_saved_that_way(tmp_path: Path) -> None:
    """Decision: a CA may sign leaves directly with a root clients trust, and then the chain is
    the leaf alone; the issuer accepts that, so the store must too (else: re-issued forever).
    Entries saved before the digest existed get the same benefit of the doubt."""
    full = issued()
    leaf_only = CertificateBundle(
        key_pem=full.key_pem, chain_pem=blocks(full.chain_pem)[0], metadata=full.metadata
    )
    s, entry = saved(tmp_path, leaf_only)
    assert result_of(s.load(KEY)) == leaf_only
    drop_digest(entry)
    assert result_of(s.load(KEY)) == leaf_only


def test_key_not_matching_the_leaf_is_unreadable(tmp_path: Path) -> None:
    s, entry = saved(tmp_path)
    key = entry / "privkey.pem"
    key.write_bytes(issued().key_pem)  # a valid key, from another bundle
    err = unreadable(s)
    assert f"{key} does not belong to {entry / 'fullchain.pem'}" in err
    assert "private key does not match" in err


def test_damaged_key_is_unreadable(tmp_path: Path) -> None:
    s, entry = saved(tmp_path)
    key = entry / "privkey.pem"
    key.write_bytes(key.read_bytes()[:100])
    err = unreadable(s)
    assert f"{key} is damaged: private key does not parse" in err


def test_placeholder_is_intact(tmp_path: Path) -> None:
    placeholder = crypto.make_placeholder_bundle(["a.example"], START)
    s, entry = saved(tmp_path, placeholder)
    assert result_of(s.load(KEY)) == placeholder
    # ... and held to the same rules
    (entry / "privkey.pem").write_bytes(issued().key_pem)
    assert "does not belong to" in unreadable(s)


def test_digest_is_store_business_only(tmp_path: Path) -> None:
    b = issued()
    s, entry = saved(tmp_path, b)
    on_disk = json.loads((entry / "metadata.json").read_text())
    assert on_disk[store.CHAIN_DIGEST_FIELD] == hashlib.sha256(b.chain_pem).hexdigest()
    assert store.CHAIN_DIGEST_FIELD not in result_of(s.load(KEY)).metadata


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_save_refuses_what_load_would_refuse(tmp_path: Path, kind: str) -> None:
    s: Any = FileStore(str(tmp_path / "storage")) if kind == "file" else MemoryStore()
    good = issued()
    result_of(s.save(KEY, good))
    truncated = CertificateBundle(key_pem=good.key_pem, chain_pem=good.chain_pem[:-50])
    mismatched = CertificateBundle(key_pem=issued().key_pem, chain_pem=good.chain_pem)
    for bad in (truncated, mismatched):
        err = failure_of(s.save(KEY, bad), StoreError)
        assert "fullchain.pem" in str(err) or "privkey.pem" in str(err)
    assert result_of(s.load(KEY)) == good


# -- hostile files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fullchain.pem", "privkey.pem", "metadata.json"])
def test_fifo_in_place_of_a_store_file_is_refused_without_blocking(
    tmp_path: Path, name: str
) -> None:
    s, entry = saved(tmp_path)
    (entry / name).unlink()
    os.mkfifo(entry / name)
    with deadline(10):
        err = unreadable(s)
    assert f"refusing to use {entry / name}: it is a FIFO" in err


@pytest.mark.parametrize("name", ["fullchain.pem", "privkey.pem", "metadata.json"])
def test_symlink_in_place_of_a_store_file_is_not_followed(tmp_path: Path, name: str) -> None:
    s, entry = saved(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_bytes((entry / name).read_bytes())  # even the right content
    (entry / name).unlink()
    (entry / name).symlink_to(target)
    err = unreadable(s)
    assert f"refusing to open {entry / name}: it is a symbolic link" in err


def test_huge_file_is_not_read(tmp_path: Path) -> None:
    s, entry = saved(tmp_path)
    chain = entry / "fullchain.pem"
    with open(chain, "ab") as f:
        f.truncate(store.MAX_FILE_BYTES + 1)
    err = unreadable(s)
    assert f"refusing to read {chain}: larger than" in err


# -- crash recovery --------------------------------------------------------------------------


def _copy_entry(src: Path, dst: Path) -> None:
    dst.mkdir(mode=0o700)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_recovery_does_not_restore_a_damaged_new_bundle(tmp_path: Path) -> None:
    """Crash between the renames, and the new directory's chain is cut short: the previous
    bundle comes back, not the damaged one."""
    old = issued()
    _, entry = saved(tmp_path, old)
    certs = entry.parent
    new_dir = certs / f"{KEY}~new-bbbbbbbbbbbb"
    staged = FileStore(str(tmp_path / "staging"))
    result_of(staged.save(KEY, issued()))
    _copy_entry(tmp_path / "staging" / "certificates" / KEY, new_dir)
    (new_dir / "fullchain.pem").write_bytes((new_dir / "fullchain.pem").read_bytes()[:-300])
    os.rename(entry, certs / f"{KEY}~old-aaaaaaaaaaaa")
    actions = FileStore(str(tmp_path / "storage"), auto_recover=False).recover()
    assert any("restored the previous bundle" in a for a in actions), actions
    assert result_of(FileStore(str(tmp_path / "storage")).load(KEY)) == old
    assert sorted(os.listdir(certs)) == [KEY]


def test_recovery_restores_nothing_rather_than_a_damaged_bundle(tmp_path: Path) -> None:
    _, entry = saved(tmp_path)
    (entry / "privkey.pem").write_bytes(issued().key_pem)  # does not match
    os.rename(entry, entry.parent / f"{KEY}~new-bbbbbbbbbbbb")
    FileStore(str(tmp_path / "storage"), auto_recover=False).recover()
    assert result_of(FileStore(str(tmp_path / "storage")).load(KEY)) is None
    assert os.listdir(entry.parent) == []


# -- what the service makes of it ------------------------------------------------------------


def test_service_reissues_a_damaged_certificate_and_never_serves_or_exports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names = ("a.example",)
    key = names_key(names)
    root = tmp_path / "storage"
    clock = Clock()
    clock.advance(START.timestamp())
    first = ca().issue(list(names))
    s = FileStore(str(root))
    result_of(s.save(key, first))
    chain = root / "certificates" / key / "fullchain.pem"
    truncated = chain.read_bytes()[:-200]
    chain.write_bytes(truncated)
    cert_path, key_path = tmp_path / "export" / "cert.pem", tmp_path / "export" / "key.pem"
    cert_path.parent.mkdir()
    service = AcmeService(
        [CertificateSpec(names=names)],
        FileStore(str(root)),
        FakeIssuer(ca=ca(), clock=clock),
        clock,
        check_jitter=0.0,
    )
    seen: list[CertificateBundle] = []

    class Seen:
        def certificate_changed(self, k: str, bundle: CertificateBundle) -> None:
            seen.append(bundle)

    service.add_consumer(Seen())  # type: ignore[arg-type]
    service.add_consumer(FileExporter(key, str(cert_path), str(key_path), str(root)))
    with caplog.at_level(logging.ERROR):
        service.startService()
        clock.advance(0)
    assert f"Cannot read the stored certificate for a.example: {chain} is damaged" in caplog.text
    [served] = seen  # only the new certificate, never the damaged one
    assert leaf_serial(served) != leaf_serial(first)
    assert chain.read_bytes() == served.chain_pem != truncated
    assert cert_path.read_bytes() == served.chain_pem
    crypto.validate_bundle(served, names, START)
    service.stopService()


# -- the CA's chain on its way in ------------------------------------------------------------


def test_canonical_chain_drops_explanatory_text_and_refuses_a_partial_block() -> None:
    b = issued()
    leaf, intermediate = blocks(b.chain_pem)
    with_text = b"subject=CN = a.example\n" + leaf + b"issuer=...\n" + intermediate
    assert crypto.canonical_chain_pem(with_text) == leaf + intermediate
    with pytest.raises(BundleError, match="truncated"):
        crypto.canonical_chain_pem(b.chain_pem[:-100])
    crypto.parse_chain(crypto.canonical_chain_pem(with_text), strict=True)


def test_strict_parse_accepts_crlf_and_surrounding_whitespace() -> None:
    b = issued()
    messy = b"\n\n" + b.chain_pem.replace(b"\n", b"\r\n") + b"\r\n\r\n  \n"
    assert len(crypto.parse_chain(messy, strict=True)) == 2
    with pytest.raises(BundleError, match="empty"):
        crypto.parse_chain(b"\n  \n", strict=True)
    with pytest.raises(BundleError, match="before any certificate"):
        crypto.parse_chain(b"hello\n" + b.chain_pem, strict=True)
