"""One contract for every storage backend, plus the file store's own guarantees.

The certificate part (ICertificateStore, IStoreAdmin) runs against FileStore, the whole file
backend and the in-memory fake; the rest of the storage contract (account, challenge tokens,
the issuance lock with its lease, change notification: IStorageBackend) against the file
backend and the fake, each through two handles on one store (two processes), on a Clock.
A new backend joins by adding itself to the two fixtures' params; the PostgreSQL store, which
needs a real server, runs every test here that takes those fixtures in
``tests/integration/test_store_contract_postgres.py`` (collected again with its fixtures). Then the
FileStore-only guarantees: file modes, crash leftovers, disk-full."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import stat
import subprocess
import sys
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from synapse_acme import fsutil, pgstore
from synapse_acme.errors import StoreError
from synapse_acme.filebackend import NOTIFY_INTERVAL, FileBackend
from synapse_acme.interfaces import (
    IAccountStore,
    ICertificateChanges,
    ICertificateStore,
    IChallengeStore,
    IIssuanceLock,
    IStorageBackend,
    IStoreAdmin,
)
from synapse_acme.model import AccountRecord, CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.pgstore import PostgresBackend
from synapse_acme.store import FileStore
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA
from tests.deferreds import failure_of, result_of


@functools.cache
def _issued(n: int) -> CertificateBundle:
    """A real key and chain per generation (stores only take intact bundles), the same
    bytes every time it is asked for, so bundles compare equal across calls."""
    return _ca().issue(["a.example"])


@functools.cache
def _ca() -> TestCA:
    return TestCA(name="Store contract")


def bundle(n: int = 1, **meta: Any) -> CertificateBundle:
    issued = _issued(n)
    return CertificateBundle(
        key_pem=issued.key_pem,
        chain_pem=issued.chain_pem,
        metadata={"names": ["a.example"], "generation": n, **meta},
    )


@pytest.fixture(params=["file", "file-backend", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "file":
        return FileStore(str(tmp_path / "storage"))
    if request.param == "file-backend":
        return FileBackend(str(tmp_path / "storage"), Clock())
    return MemoryStore()


# -- contract ------------------------------------------------------------------------------


def test_provides_interface(store: Any) -> None:
    assert verifyObject(ICertificateStore, store)
    assert verifyObject(IStoreAdmin, store)


def test_load_missing_is_none(store: Any) -> None:
    assert result_of(store.load("a.example")) is None
    assert result_of(store.keys()) == []


def test_save_then_load_round_trips(store: Any) -> None:
    b = bundle(1, issued_at="2026-01-01T00:00:00+00:00", placeholder=False)
    assert result_of(store.save("a.example", b)) is None
    loaded = result_of(store.load("a.example"))
    assert loaded == b
    assert loaded.key_pem == b.key_pem and loaded.chain_pem == b.chain_pem
    assert dict(loaded.metadata) == dict(b.metadata)


def test_loaded_metadata_is_a_copy(store: Any) -> None:
    result_of(store.save("a.example", bundle(1)))
    first = result_of(store.load("a.example"))
    first.metadata["generation"] = 99
    assert result_of(store.load("a.example")).metadata["generation"] == 1


def test_replace_keeps_only_the_new_bundle(store: Any) -> None:
    result_of(store.save("a.example", bundle(1)))
    result_of(store.save("a.example", bundle(2)))
    assert result_of(store.load("a.example")) == bundle(2)
    assert result_of(store.keys()) == ["a.example"]


def test_keys_sorted(store: Any) -> None:
    wild = names_key(["*.b.example"])
    multi = names_key(["c.example", "a.example"])
    for k in ("z.example", wild, multi, "a.example"):
        result_of(store.save(k, bundle(1)))
    assert result_of(store.keys()) == sorted(["z.example", wild, multi, "a.example"])
    assert result_of(store.load("never.example")) is None
    assert "never.example" not in result_of(store.keys())


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/b",
        "..",
        "",
        ".",
        "a\x00b",
        "A.example",
        "a..b",
        "/etc",
        "a\\b",
        "x~new-1",
        "a b",
        "*.example",
        "é.example",
        "a" * 256,
        None,
        b"a.example",
    ],
)
def test_unsafe_keys_are_refused_everywhere(store: Any, bad: Any) -> None:
    failure_of(store.save(bad, bundle(1)), StoreError)
    failure_of(store.load(bad), StoreError)
    assert result_of(store.keys()) == []


def test_keys_from_names_key_are_accepted(store: Any) -> None:
    for names in (
        ["matrix.example.org"],
        ["*.example.org"],
        ["b.example", "a.example", "xn--bcher-kva.example"],
    ):
        k = names_key(names)
        result_of(store.save(k, bundle(3)))
        assert result_of(store.load(k)) == bundle(3)


def test_non_json_metadata_is_refused_and_old_kept(store: Any) -> None:
    result_of(store.save("a.example", bundle(1)))
    bad = CertificateBundle(key_pem=b"k", chain_pem=b"c", metadata={"when": object()})
    failure_of(store.save("a.example", bad), StoreError)
    assert result_of(store.load("a.example")) == bundle(1)


def test_empty_key_or_chain_is_refused(store: Any) -> None:
    failure_of(store.save("a.example", CertificateBundle(key_pem=b"", chain_pem=b"c")), StoreError)
    failure_of(store.save("a.example", CertificateBundle(key_pem=b"k", chain_pem=b"")), StoreError)
    assert result_of(store.load("a.example")) is None


def test_failed_save_leaves_old_bundle(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No partial state: a save that fails mid-way leaves exactly the previous bundle."""
    result_of(store.save("a.example", bundle(1)))
    if isinstance(store, MemoryStore):
        store.fail_next_save()
    elif isinstance(store, PostgresBackend):
        # the row is written, then its notification fails: the transaction must roll back whole
        monkeypatch.setattr(pgstore, "CHANNEL", "")
    else:
        calls = {"n": 0}
        real_write = os.write

        def write_then_fail(fd: int, data: Any) -> int:
            calls["n"] += 1
            if calls["n"] == 2:  # the key is written, the chain is not
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write_then_fail)
    failure_of(store.save("a.example", bundle(2)), StoreError)
    monkeypatch.undo()
    assert result_of(store.load("a.example")) == bundle(1)
    assert result_of(store.keys()) == ["a.example"]
    # and the store still works afterwards
    result_of(store.save("a.example", bundle(3)))
    assert result_of(store.load("a.example")) == bundle(3)


# -- the rest of the storage contract (IStorageBackend), through two handles -----------------

LEASE = 30.0


@attrs.define
class Handles:
    """Two handles on one store (two processes), the clock both use, and how long a change
    may take to be reported."""

    a: Any
    b: Any
    clock: Clock
    notify_within: float


@pytest.fixture(params=["file", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Handles:
    clock = Clock()
    clock.advance(1_000_000)  # leases are compared on this clock; start far from zero
    if request.param == "file":
        root = str(tmp_path / "storage")
        return Handles(
            FileBackend(root, clock), FileBackend(root, clock), clock, NOTIFY_INTERVAL + 0.1
        )
    a = MemoryStore(clock=clock)
    return Handles(a, a.another_handle(), clock, 0.0)


@pytest.mark.parametrize(
    "interface",
    [
        IStorageBackend,
        ICertificateStore,
        IStoreAdmin,
        IAccountStore,
        IChallengeStore,
        IIssuanceLock,
        ICertificateChanges,
    ],
)
def test_backend_provides_every_part(backend: Handles, interface: Any) -> None:
    assert verifyObject(interface, backend.a)


def test_account_key_is_created_once_and_shared(backend: Handles) -> None:
    a, b = backend.a, backend.b
    assert result_of(a.load_account_key()) is None
    assert result_of(a.create_account_key(b"first key")) is True
    # the other process lost the race: nothing replaced, it loads the winner's key
    assert result_of(b.create_account_key(b"second key")) is False
    assert result_of(b.load_account_key()) == b"first key"
    assert result_of(a.load_account_key()) == b"first key"
    failure_of(a.create_account_key(b""), StoreError)
    assert result_of(a.load_account_key()) == b"first key"


def test_account_record_round_trips_and_is_replaced(backend: Handles) -> None:
    a, b = backend.a, backend.b
    assert result_of(a.load_account_record()) is None
    first = AccountRecord(url="https://ca/acct/1", directory="https://ca/dir", thumbprint="t1")
    assert result_of(a.save_account_record(first)) is None
    assert result_of(b.load_account_record()) == first
    second = AccountRecord(url="https://ca/acct/2", directory="https://ca/dir", thumbprint="t2")
    result_of(b.save_account_record(second))
    assert result_of(a.load_account_record()) == second


def test_any_handle_answers_a_challenge(backend: Handles) -> None:
    a, b = backend.a, backend.b
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
    assert result_of(b.get_challenge(token)) is None
    assert result_of(a.put_challenge(token, f"{token}.thumb")) is None
    assert result_of(b.get_challenge(token)) == f"{token}.thumb"
    result_of(a.put_challenge(token, f"{token}.other"))  # replaced
    assert result_of(b.get_challenge(token)) == f"{token}.other"
    long_token = "A" * 256  # the longest a CA may send; longer than a file name may be
    result_of(a.put_challenge(long_token, "x.y"))
    assert result_of(b.get_challenge(long_token)) == "x.y"
    assert result_of(b.remove_challenge(token)) is None
    assert result_of(a.get_challenge(token)) is None
    assert result_of(a.get_challenge(long_token)) == "x.y"  # only that one went
    assert result_of(a.remove_challenge(token)) is None  # unknown: not an error


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a.b", "é", "A" * 257, None, b"tok"])
def test_malformed_tokens_are_never_stored(backend: Handles, bad: Any) -> None:
    failure_of(backend.a.put_challenge(bad, "x.y"), ValueError)
    assert result_of(backend.a.get_challenge(bad)) is None
    assert result_of(backend.a.remove_challenge(bad)) is None


def test_non_ascii_answer_is_refused(backend: Handles) -> None:
    failure_of(backend.a.put_challenge("tok", "é"), ValueError)
    assert result_of(backend.b.get_challenge("tok")) is None


def test_lease_excludes_other_holders_until_it_expires(backend: Handles) -> None:
    a, b, clock = backend.a, backend.b, backend.clock
    assert result_of(a.acquire("a.example", "host1:1", LEASE)) is True
    assert result_of(b.acquire("a.example", "host2:2", LEASE)) is False
    assert result_of(b.acquire("b.example", "host2:2", LEASE)) is True  # names are independent
    clock.advance(LEASE - 0.01)
    assert result_of(b.acquire("a.example", "host2:2", LEASE)) is False
    clock.advance(0.01)  # the holder died and never renewed: at expiry the lock is free
    assert result_of(b.acquire("a.example", "host2:2", LEASE)) is True
    assert result_of(a.acquire("a.example", "host1:1", LEASE)) is False


def test_acquire_again_by_the_holder_extends(backend: Handles) -> None:
    a, b, clock = backend.a, backend.b, backend.clock
    assert result_of(a.acquire("a.example", "h1", LEASE)) is True
    clock.advance(20)
    assert result_of(b.acquire("a.example", "h1", LEASE)) is True  # same holder, other handle
    clock.advance(20)  # 40 s after the first acquire, 20 s into the second lease
    assert result_of(a.acquire("a.example", "h2", LEASE)) is False


def test_renew_keeps_the_lease_and_fails_once_it_expired(backend: Handles) -> None:
    a, b, clock = backend.a, backend.b, backend.clock
    assert result_of(a.renew("a.example", "h1", LEASE)) is False  # never taken
    assert result_of(a.acquire("a.example", "h1", LEASE)) is True
    for _ in range(5):  # renewing every 20 s keeps it for as long as the job runs
        clock.advance(20)
        assert result_of(a.renew("a.example", "h1", LEASE)) is True
        assert result_of(b.acquire("a.example", "h2", LEASE)) is False
    assert result_of(b.renew("a.example", "h2", LEASE)) is False  # not its lease
    clock.advance(LEASE)  # the holder stalled past its lease: it must stop, even if
    assert result_of(a.renew("a.example", "h1", LEASE)) is False  # nobody took it since
    assert result_of(b.acquire("a.example", "h2", LEASE)) is True
    assert result_of(a.renew("a.example", "h1", LEASE)) is False


def test_release_frees_only_the_holders_own_lease(backend: Handles) -> None:
    a, b = backend.a, backend.b
    assert result_of(a.release("a.example", "h1")) is None  # nothing held: fine
    assert result_of(a.acquire("a.example", "h1", LEASE)) is True
    assert result_of(b.release("a.example", "h2")) is None
    assert result_of(b.acquire("a.example", "h2", LEASE)) is False  # still h1's
    assert result_of(b.release("a.example", "h1")) is None  # the holder, from any handle
    assert result_of(b.acquire("a.example", "h2", LEASE)) is True


@pytest.mark.parametrize("bad", ["../x", "", "A.example", "a/b", None])
def test_lock_names_are_store_keys(backend: Handles, bad: Any) -> None:
    failure_of(backend.a.acquire(bad, "h1", LEASE), StoreError)
    failure_of(backend.a.renew(bad, "h1", LEASE), StoreError)
    failure_of(backend.a.release(bad, "h1"), StoreError)


@pytest.mark.parametrize(
    ("holder", "seconds"), [("", LEASE), (None, LEASE), ("h1", 0), ("h1", -1), ("h1", math.inf)]
)
def test_bad_holder_or_lease_is_refused(backend: Handles, holder: Any, seconds: Any) -> None:
    failure_of(backend.a.acquire("a.example", holder, seconds), ValueError)
    failure_of(backend.a.renew("a.example", holder, seconds), ValueError)
    assert result_of(backend.a.acquire("a.example", "h1", LEASE)) is True  # nothing was taken


def test_change_notification_reaches_every_handle(backend: Handles) -> None:
    a, b, clock = backend.a, backend.b, backend.clock
    seen_a: list[str] = []
    seen_b: list[str] = []
    unsubscribe_a = a.subscribe(seen_a.append)
    b.subscribe(seen_b.append)
    clock.advance(backend.notify_within * 3)
    assert seen_a == [] and seen_b == []  # nothing changed, nothing reported
    result_of(b.save("a.example", bundle(1)))  # another process saves
    clock.advance(backend.notify_within)
    assert set(seen_a) == {"a.example"} and set(seen_b) == {"a.example"}
    seen_a.clear()
    seen_b.clear()
    result_of(a.save("a.example", bundle(2)))  # a replacement is a change too
    result_of(a.save("b.example", bundle(1)))
    clock.advance(backend.notify_within)
    assert set(seen_a) == {"a.example", "b.example"} == set(seen_b)
    unsubscribe_a()
    seen_a.clear()
    result_of(b.save("a.example", bundle(3)))
    clock.advance(backend.notify_within)
    assert seen_a == [] and "a.example" in seen_b
    unsubscribe_a()  # twice is harmless


def test_a_failing_subscriber_does_not_stop_the_others(
    backend: Handles, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def broken(key: str) -> None:
        raise RuntimeError("subscriber bug")

    backend.a.subscribe(broken)
    backend.a.subscribe(seen.append)
    with caplog.at_level("ERROR"):
        result_of(backend.b.save("a.example", bundle(1)))
        backend.clock.advance(backend.notify_within)
    assert seen == ["a.example"]
    assert "subscriber failed for a.example" in caplog.text
    seen.clear()
    result_of(backend.b.save("a.example", bundle(2)))  # and notification keeps working
    backend.clock.advance(backend.notify_within)
    assert seen == ["a.example"]


def test_a_failed_save_is_not_a_change(backend: Handles) -> None:
    seen: list[str] = []
    backend.a.subscribe(seen.append)
    bad = CertificateBundle(key_pem=b"k", chain_pem=b"c")
    failure_of(backend.b.save("a.example", bad), StoreError)
    backend.clock.advance(backend.notify_within * 2)
    assert seen == []


# -- FileBackend specifics -------------------------------------------------------------------


def test_file_backend_layout_and_modes(tmp_path: Any) -> None:
    root = tmp_path / "storage"
    fb = FileBackend(str(root), Clock())
    result_of(fb.create_account_key(b"key"))
    result_of(fb.put_challenge("tok", "tok.thumb"))
    result_of(fb.acquire("a.example", "h1", LEASE))
    assert _mode(root / "account.key") == 0o600
    assert _mode(root / "challenges") == 0o700 and _mode(root / "locks") == 0o700
    assert json.loads((root / "locks" / "a.example.lease").read_text()) == {
        "holder": "h1",
        "expires": LEASE,
    }


def test_file_backend_account_key_file_elsewhere(tmp_path: Any) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    fb = FileBackend(str(tmp_path / "storage"), Clock(), account_key_file=str(secrets / "acct"))
    assert result_of(fb.create_account_key(b"key")) is True
    assert (secrets / "acct").read_bytes() == b"key"
    # a missing directory outside the storage directory is not created (a typo is not a path)
    fb = FileBackend(str(tmp_path / "storage"), Clock(), account_key_file="/nonexistent/x/acct")
    assert "does not exist" in str(failure_of(fb.create_account_key(b"key"), StoreError))


def test_file_backend_damaged_lease_is_free(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fb = FileBackend(str(tmp_path), Clock())
    result_of(fb.acquire("a.example", "h1", LEASE))
    (tmp_path / "locks" / "a.example.lease").write_text("{not json")
    with caplog.at_level("WARNING"):
        assert result_of(fb.acquire("a.example", "h2", LEASE)) is True
    assert "damaged lease" in caplog.text


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OTHER_PROCESS = """
import sys, time
from synapse_acme.filebackend import NOTIFY_INTERVAL, FileBackend
class Wall:
    def seconds(self): return time.time()
fb = FileBackend(sys.argv[1], Wall())
fb.acquire("a.example", sys.argv[2], 60).addCallback(lambda ok: print(ok))
"""


def test_file_backend_lease_holds_across_processes(tmp_path: Any) -> None:
    def other(holder: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path), holder],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": _REPO},  # this checkout, not an installed copy
        )
        return out.stdout.strip()

    assert other("process-1") == "True"
    assert other("process-2") == "False"  # process-1 exited, but its lease is in force
    assert other("process-1") == "True"  # its holder name may take it again


# -- MemoryStore specifics -----------------------------------------------------------------


def test_memory_fail_next_save_custom_exception() -> None:
    s = MemoryStore()
    s.fail_next_save(RuntimeError("boom"))
    failure_of(s.save("a.example", bundle(1)), RuntimeError)
    result_of(s.save("a.example", bundle(1)))
    assert s.saves == 1


# -- FileStore specifics --------------------------------------------------------------------


def _mode(path: Any) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_layout_and_modes(tmp_path: Any) -> None:
    old_umask = os.umask(0o022)
    try:
        s = FileStore(str(tmp_path / "storage"))
        result_of(s.save("a.example", bundle(1)))
    finally:
        os.umask(old_umask)
    root = tmp_path / "storage"
    d = root / "certificates" / "a.example"
    assert _mode(root) == 0o700
    assert _mode(root / "certificates") == 0o700
    assert _mode(d) == 0o700
    assert _mode(d / "privkey.pem") == 0o600
    assert sorted(os.listdir(d)) == ["fullchain.pem", "metadata.json", "privkey.pem"]
    assert (d / "fullchain.pem").read_bytes() == bundle(1).chain_pem
    assert json.loads((d / "metadata.json").read_text())["generation"] == 1
    # nothing but the entry itself is left in the certificates directory
    assert os.listdir(root / "certificates") == ["a.example"]


def test_existing_loose_root_is_tightened(tmp_path: Any) -> None:
    root = tmp_path / "storage"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    result_of(FileStore(str(root)).save("a.example", bundle(1)))
    assert _mode(root) == 0o700


def test_corrupt_entries_fail_naming_the_path(tmp_path: Any) -> None:
    s = FileStore(str(tmp_path))
    result_of(s.save("a.example", bundle(1)))
    result_of(s.save("b.example", bundle(1)))
    meta = tmp_path / "certificates" / "a.example" / "metadata.json"
    meta.write_text("{not json")
    err = failure_of(s.load("a.example"), StoreError)
    assert str(meta) in str(err)
    chain = tmp_path / "certificates" / "b.example" / "fullchain.pem"
    chain.unlink()
    err = failure_of(s.load("b.example"), StoreError)
    assert str(chain) in str(err)
    # a JSON value that is not an object is corrupt too
    meta.write_text("[1, 2]")
    assert "not a JSON object" in str(failure_of(s.load("a.example"), StoreError))


def test_key_never_appears_in_errors(tmp_path: Any) -> None:
    s = FileStore(str(tmp_path))
    b = bundle(1)
    result_of(s.save("a.example", b))
    (tmp_path / "certificates" / "a.example" / "metadata.json").write_text("nope")
    err = failure_of(s.load("a.example"), StoreError)
    body = b"".join(b.key_pem.splitlines()[1:-1])
    assert body[:24] not in str(err).encode()
    # nor when the key itself is what is damaged
    (tmp_path / "certificates" / "a.example" / "metadata.json").write_text("{}")
    key_file = tmp_path / "certificates" / "a.example" / "privkey.pem"
    key_file.write_bytes(b.key_pem[:-60])
    err = failure_of(s.load("a.example"), StoreError)
    assert str(key_file) in str(err) and body[:24] not in str(err).encode()


def _make_entry(path: Any, n: int, complete: bool = True) -> None:
    path.mkdir(mode=0o700)
    b = bundle(n)
    (path / "privkey.pem").write_bytes(b.key_pem)
    (path / "fullchain.pem").write_bytes(b.chain_pem)
    if complete:
        (path / "metadata.json").write_text(json.dumps(dict(b.metadata)))


def _leftover_store(tmp_path: Any) -> tuple[FileStore, Any]:
    s = FileStore(str(tmp_path), auto_recover=False)
    result_of(s.save("seed.example", bundle(0)))
    return s, tmp_path / "certificates"


def test_recover_promotes_complete_new_when_final_missing(tmp_path: Any) -> None:
    """Crash between the two renames: old moved aside, new not yet in place."""
    s, certs = _leftover_store(tmp_path)
    _make_entry(certs / "a.example~old-aaaaaaaaaaaa", 1)
    _make_entry(certs / "a.example~new-bbbbbbbbbbbb", 2)
    actions = s.recover()
    assert any("restored the new bundle" in a for a in actions)
    assert result_of(s.load("a.example")) == bundle(2)
    assert sorted(os.listdir(certs)) == ["a.example", "seed.example"]


def test_recover_restores_old_when_new_incomplete(tmp_path: Any) -> None:
    s, certs = _leftover_store(tmp_path)
    _make_entry(certs / "a.example~old-aaaaaaaaaaaa", 1)
    _make_entry(certs / "a.example~new-bbbbbbbbbbbb", 2, complete=False)
    s.recover()
    assert result_of(s.load("a.example")) == bundle(1)
    assert sorted(os.listdir(certs)) == ["a.example", "seed.example"]


def test_recover_removes_incomplete_new_without_final(tmp_path: Any) -> None:
    """Crash while writing the very first bundle for a key: nothing is stored."""
    s, certs = _leftover_store(tmp_path)
    _make_entry(certs / "a.example~new-bbbbbbbbbbbb", 2, complete=False)
    actions = s.recover()
    assert actions
    assert result_of(s.load("a.example")) is None
    assert result_of(s.keys()) == ["seed.example"]


def test_recover_keeps_final_and_drops_unfinished_save(tmp_path: Any) -> None:
    """Crash before the first rename: the save never succeeded, the old bundle stays."""
    s, certs = _leftover_store(tmp_path)
    result_of(s.save("a.example", bundle(1)))
    _make_entry(certs / "a.example~new-bbbbbbbbbbbb", 2)
    _make_entry(certs / "a.example~old-cccccccccccc", 0)
    _make_entry(certs / "a.example~del-dddddddddddd", 0)
    s.recover()
    assert result_of(s.load("a.example")) == bundle(1)
    assert sorted(os.listdir(certs)) == ["a.example", "seed.example"]


def test_recover_removes_stray_temp_files_only(tmp_path: Any) -> None:
    s, certs = _leftover_store(tmp_path)
    stray = tmp_path / ".exports.json.0123456789ab.tmp"
    stray.write_bytes(b"x")
    stray2 = certs / ".foo.abcdefabcdef.tmp"
    stray2.write_bytes(b"x")
    keep = tmp_path / "account.key"
    keep.write_bytes(b"x")
    unrelated = certs / "a.example~weird"
    unrelated.mkdir()
    actions = s.recover()
    assert not stray.exists() and not stray2.exists()
    assert keep.exists() and unrelated.exists()
    assert len(actions) == 2


def test_auto_recover_runs_once_before_first_use(tmp_path: Any) -> None:
    certs = tmp_path / "certificates"
    certs.mkdir(parents=True)
    _make_entry(certs / "a.example~new-bbbbbbbbbbbb", 2)
    s = FileStore(str(tmp_path))
    assert result_of(s.keys()) == ["a.example"]
    assert result_of(s.load("a.example")) == bundle(2)


def test_recover_on_empty_root_is_noop(tmp_path: Any) -> None:
    assert FileStore(str(tmp_path / "nothing")).recover() == []


def test_enospc_on_fsync_keeps_old_bundle(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = FileStore(str(tmp_path))
    result_of(s.save("a.example", bundle(1)))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    err = failure_of(s.save("a.example", bundle(2)), StoreError)
    monkeypatch.undo()
    assert "ENOSPC" in str(err) and "No space left on device" in str(err)
    assert "a.example" in str(err)
    assert result_of(s.load("a.example")) == bundle(1)
    assert os.listdir(tmp_path / "certificates") == ["a.example"]


def test_rename_failure_puts_old_back(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = FileStore(str(tmp_path))
    result_of(s.save("a.example", bundle(1)))
    real_rename = os.rename
    calls = {"n": 0}

    def second_rename_fails(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # old moved aside; moving new into place fails
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    err = failure_of(s.save("a.example", bundle(2)), StoreError)
    monkeypatch.undo()
    assert "EROFS" in str(err)
    assert result_of(s.load("a.example")) == bundle(1)
    assert os.listdir(tmp_path / "certificates") == ["a.example"]


def test_loose_key_file_mode_is_warned(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    s = FileStore(str(tmp_path))
    result_of(s.save("a.example", bundle(1)))
    os.chmod(tmp_path / "certificates" / "a.example" / "privkey.pem", 0o644)
    with caplog.at_level("WARNING"):
        assert result_of(s.load("a.example")) == bundle(1)
    assert "looser than 0600" in caplog.text


def test_symlinked_entry_is_not_followed(tmp_path: Any) -> None:
    s = FileStore(str(tmp_path / "storage"))
    result_of(s.save("a.example", bundle(1)))
    elsewhere = tmp_path / "elsewhere"
    _make_entry(elsewhere, 5)
    os.symlink(elsewhere, tmp_path / "storage" / "certificates" / "evil.example")
    assert result_of(s.keys()) == ["a.example"]
    failure_of(s.load("evil.example"), StoreError)


def test_file_store_unwritable_root_is_store_error(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    s = FileStore(str(blocker))
    err = failure_of(s.save("a.example", bundle(1)), StoreError)
    assert str(blocker) in str(err)


def test_fsutil_temp_names_are_recognised() -> None:
    assert fsutil.is_temp_name(os.path.basename(fsutil.temp_name_for("/x/exports.json")))
    assert not fsutil.is_temp_name(".hidden")
    assert not fsutil.is_temp_name("a.example")


class _Crash(BaseException):
    """Process death: not an Exception, so no cleanup handler runs."""


_CRASH_POINTS = [
    (os, "open"),
    (os, "write"),
    (os, "fsync"),
    (os, "fchmod"),
    (os, "chmod"),
    (os, "mkdir"),
    (os, "rename"),
    (os, "close"),
]


def _crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> dict[str, int]:
    """Make the n-th filesystem call (of the kinds above) kill the 'process'."""
    counter = {"calls": 0}
    for module, name in _CRASH_POINTS:
        real = getattr(module, name)

        def wrapper(*args: Any, _real: Any = real, **kw: Any) -> Any:
            counter["calls"] += 1
            if counter["calls"] == n:
                raise _Crash()
            return _real(*args, **kw)

        monkeypatch.setattr(module, name, wrapper)
    return counter


@pytest.mark.parametrize("first_save", [True, False])
def test_crash_at_every_step_of_a_save_leaves_old_or_new(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, first_save: bool
) -> None:
    """Kill the save at each filesystem call in turn; after restart+recover the store holds
    exactly the old bundle or exactly the new one, and no leftovers."""
    n = 0
    while True:
        n += 1
        root = tmp_path / f"run{n}"
        if not first_save:
            result_of(FileStore(str(root)).save("a.example", bundle(1)))
        counter = _crash_at(monkeypatch, n)
        crashed = False
        try:
            result_of(FileStore(str(root), auto_recover=False).save("a.example", bundle(2)))
        except _Crash:
            crashed = True
        monkeypatch.undo()
        restarted = FileStore(str(root))
        loaded = result_of(restarted.load("a.example"))
        allowed = [bundle(2)] if not crashed else [bundle(2), None if first_save else bundle(1)]
        assert loaded in allowed, (n, loaded)
        certs = root / "certificates"
        leftovers = [e for e in os.listdir(certs) if e != "a.example"] if certs.exists() else []
        assert leftovers == [], (n, leftovers)
        if not crashed:
            assert counter["calls"] < n
            break
    assert n > 10  # the save really went through many steps


def test_interrupted_delete_leftover_completes_on_recover(tmp_path: Any) -> None:
    """A ``~del-`` directory (an entry renamed away by a delete that was killed before its
    rmtree, as earlier versions could leave) is finished, never restored."""
    certs = tmp_path / "certificates"
    certs.mkdir(parents=True)
    _make_entry(certs / "a.example~del-dddddddddddd", 1)
    restarted = FileStore(str(tmp_path))
    assert result_of(restarted.load("a.example")) is None
    assert os.listdir(certs) == []
