"""Group commit: FileStore.save_many makes several saves durable with one disk flush, and each
keeps its own atomicity and its own result; the store's integrity check trusts a pair of bytes
that validate_bundle already verified in this process."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from synapse_acme import crypto, fsutil
from synapse_acme.errors import StoreError
from synapse_acme.store import FileStore
from tests.certs import TestCA
from tests.deferreds import result_of


def _entries(store: FileStore) -> list[str]:
    return sorted(os.listdir(store.certificates_dir))


def test_save_many_saves_each_and_flushes_once_for_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = TestCA()
    store = FileStore(str(tmp_path / "store"))
    old = ca.issue(["b.example"])
    assert result_of(store.save("b.example", old)) is None
    bundles = {k: ca.issue([k]) for k in ("a.example", "b.example", "c.example")}
    flushes: list[list[str]] = []
    real = fsutil.fsync_all
    monkeypatch.setattr(
        fsutil, "fsync_all", lambda paths: flushes.append(list(paths)) or real(paths)
    )
    errors = result_of(store.save_many(list(bundles.items())))
    assert errors == [None, None, None]
    assert len(flushes) == 1 and len(flushes[0]) == 3 * 4  # three files and a directory each
    for key, bundle in bundles.items():
        assert result_of(store.load(key)) == bundle
    assert _entries(store) == sorted(bundles)  # no ~new- or ~old- left, b's old bundle gone
    key_file = os.path.join(store.path_for("a.example"), "privkey.pem")
    assert os.stat(key_file).st_mode & 0o777 == 0o600


def test_one_bad_item_fails_alone(tmp_path: Path) -> None:
    ca, other = TestCA(), TestCA(name="Other")
    store = FileStore(str(tmp_path / "store"))
    kept = ca.issue(["b.example"])
    assert result_of(store.save("b.example", kept)) is None
    good = ca.issue(["a.example"])
    # b's new bundle: a key that is not its leaf's, which load would refuse
    mismatched = attrs.evolve(ca.issue(["b.example"]), key_pem=other.issue(["x"]).key_pem)
    errors = result_of(
        store.save_many([("a.example", good), ("b.example", mismatched), ("../up", good)])
    )
    assert errors[0] is None
    assert isinstance(errors[1], StoreError) and "does not belong" in str(errors[1])
    assert isinstance(errors[2], StoreError) and "unsafe store key" in str(errors[2])
    assert result_of(store.load("a.example")) == good
    assert result_of(store.load("b.example")) == kept  # the old bundle is untouched
    assert _entries(store) == ["a.example", "b.example"]


def test_a_failed_flush_fails_every_item_and_keeps_every_old_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = TestCA()
    store = FileStore(str(tmp_path / "store"))
    olds = {k: ca.issue([k]) for k in ("a.example", "b.example")}
    for k, b in olds.items():
        assert result_of(store.save(k, b)) is None

    def eio(paths: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil, "fsync_all", eio)
    errors = result_of(store.save_many([(k, ca.issue([k])) for k in (*olds, "c.example")]))
    assert all(isinstance(e, StoreError) and "Input/output error" in str(e) for e in errors)
    for k, b in olds.items():
        assert result_of(store.load(k)) == b
    assert result_of(store.load("c.example")) is None
    assert _entries(store) == sorted(olds)  # every ~new- directory removed


def test_the_same_key_twice_in_a_batch_ends_with_the_later_bundle(tmp_path: Path) -> None:
    ca = TestCA()
    store = FileStore(str(tmp_path / "store"))
    first, second = ca.issue(["a.example"]), ca.issue(["a.example"])
    assert result_of(store.save_many([("a.example", first), ("a.example", second)])) == [
        None,
        None,
    ]
    assert result_of(store.load("a.example")) == second
    assert _entries(store) == ["a.example"]


def test_integrity_check_trusts_only_verified_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synapse_acme import store as store_module

    crypto.forget_verified()
    ca = TestCA()
    bundle = ca.issue(["a.example"])
    orders: list[int] = []
    real = crypto.check_chain_order
    monkeypatch.setattr(crypto, "check_chain_order", lambda c: orders.append(1) or real(c))
    where = str(tmp_path)
    store_module.check_intact(bundle, where)
    assert len(orders) == 1  # not verified yet: checked in full
    crypto.validate_bundle(bundle, ["a.example"], ca.now)
    orders.clear()
    store_module.check_intact(bundle, where)
    assert orders == []  # the very same bytes passed validate_bundle: signatures not redone
    # anything else than those bytes is checked in full; junk between blocks is still refused
    with pytest.raises(StoreError, match="damaged"):
        store_module.check_intact(
            attrs.evolve(bundle, chain_pem=b"junk\n" + bundle.chain_pem), where
        )
    other = TestCA(name="Other").issue(["a.example"])
    with pytest.raises(StoreError, match="does not belong"):
        store_module.check_intact(attrs.evolve(bundle, key_pem=other.key_pem), where)
    crypto.forget_verified()
