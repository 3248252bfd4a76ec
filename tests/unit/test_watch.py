"""FileWatcher and install_sighup: real files in a temp dir, time from a Clock.

Covers certbot's way of renewing (``live/`` symlinks flipped to new ``archive/`` files, one
after the other), a plain rewrite, a ``touch`` (no change), a half-finished renewal (no error
until it persists), and that the next handshake through HotSwapTLS sees the new serial within
one watch interval.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle
from synapse_acme.tls import HotSwapTLS
from synapse_acme.watch import FileWatcher, install_sighup
from tests.certs import TestCA, handshake, leaf_serial

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.timezone.utc)
INTERVAL = 5.0


@implementer(ICertificateConsumer)
class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[str, CertificateBundle]] = []

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        self.got.append((key, bundle))


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(now=NOW)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW.timestamp())
    return c


def write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Certbot:
    """certbot's layout: live/NAME/{fullchain,privkey}.pem -> ../../archive/NAME/*N.pem."""

    def __init__(self, root: Path) -> None:
        self.archive = root / "archive" / "example.test"
        self.live = root / "live" / "example.test"
        self.archive.mkdir(parents=True)
        self.live.mkdir(parents=True)
        self.n = 0

    @property
    def cert(self) -> str:
        return str(self.live / "fullchain.pem")

    @property
    def key(self) -> str:
        return str(self.live / "privkey.pem")

    def _link(self, name: str, target: str) -> None:
        tmp = self.live / (name + ".new")
        os.symlink(os.path.join("..", "..", "archive", "example.test", target), tmp)
        os.replace(tmp, self.live / name)

    def write_archive(self, bundle: CertificateBundle) -> None:
        self.n += 1
        (self.archive / f"fullchain{self.n}.pem").write_bytes(bundle.chain_pem)
        (self.archive / f"privkey{self.n}.pem").write_bytes(bundle.key_pem)

    def flip_cert(self) -> None:
        self._link("fullchain.pem", f"fullchain{self.n}.pem")

    def flip_key(self) -> None:
        self._link("privkey.pem", f"privkey{self.n}.pem")

    def renew(self, bundle: CertificateBundle) -> None:
        self.write_archive(bundle)
        self.flip_cert()
        self.flip_key()


def test_certbot_symlink_flip_reaches_next_handshake(
    tmp_path: Path, ca: TestCA, clock: Clock
) -> None:
    certbot = Certbot(tmp_path)
    first = ca.issue(["example.test"])
    certbot.renew(first)
    tls = HotSwapTLS(clock=clock, default_key="example.test")
    watcher = FileWatcher(certbot.cert, certbot.key, "example.test", tls, clock, INTERVAL)
    watcher.startService()
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(first)

    second = ca.issue(["example.test"])
    certbot.renew(second)
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(first)  # not yet polled
    clock.advance(INTERVAL)
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(second)
    watcher.stopService()
    assert not clock.getDelayedCalls()


def test_plain_rewrite(tmp_path: Path, ca: TestCA, clock: Clock) -> None:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    first = ca.issue(["example.test"])
    cert.write_bytes(first.chain_pem)
    key.write_bytes(first.key_pem)
    tls = HotSwapTLS(clock=clock)
    watcher = FileWatcher(str(cert), str(key), "main", tls, clock, INTERVAL)
    watcher.startService()
    second = ca.issue(["example.test"])
    # rewritten in place (same inode), key first, as a careless script would
    with open(key, "wb") as f:
        f.write(second.key_pem)
    with open(cert, "wb") as f:
        f.write(second.chain_pem)
    clock.advance(INTERVAL)
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(second)
    watcher.stopService()


def test_touch_is_not_a_change(tmp_path: Path, ca: TestCA, clock: Clock) -> None:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    bundle = ca.issue(["example.test"])
    write(cert, bundle.chain_pem)
    write(key, bundle.key_pem)
    consumer = Recorder()
    watcher = FileWatcher(str(cert), str(key), "main", consumer, clock, INTERVAL)
    assert watcher.check() is True
    assert watcher.check() is False  # nothing changed: stat only
    os.utime(cert, ns=(1, 1))
    write(key, bundle.key_pem)  # same content, new inode
    assert watcher.check() is False
    assert len(consumer.got) == 1
    key_name, got = consumer.got[0]
    assert key_name == "main"
    assert (got.chain_pem, got.key_pem) == (bundle.chain_pem, bundle.key_pem)


def test_half_renewed_waits_then_errors_only_if_it_persists(
    tmp_path: Path, ca: TestCA, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    certbot = Certbot(tmp_path)
    first, second = ca.issue(["example.test"]), ca.issue(["example.test"])
    certbot.renew(first)
    consumer = Recorder()
    watcher = FileWatcher(certbot.cert, certbot.key, "main", consumer, clock, INTERVAL, grace=30.0)
    caplog.set_level(logging.INFO, logger="synapse_acme.watch")
    watcher.startService()
    assert len(consumer.got) == 1

    # certbot died between the two flips: new cert, old key
    certbot.write_archive(second)
    certbot.flip_cert()
    clock.advance(INTERVAL)
    assert len(consumer.got) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("not usable yet" in r.getMessage() for r in caplog.records)
    clock.advance(INTERVAL * 3)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    clock.advance(INTERVAL * 4)  # 35 s > grace
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "does not match" in errors[0].getMessage()
    assert "PRIVATE KEY" not in errors[0].getMessage()
    clock.advance(INTERVAL * 10)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # once

    certbot.flip_key()
    clock.advance(INTERVAL)
    assert [leaf_serial(b) for _, b in consumer.got] == [leaf_serial(first), leaf_serial(second)]
    watcher.stopService()


def test_short_mismatch_is_silent(
    tmp_path: Path, ca: TestCA, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    certbot = Certbot(tmp_path)
    certbot.renew(ca.issue(["example.test"]))
    consumer = Recorder()
    watcher = FileWatcher(certbot.cert, certbot.key, "main", consumer, clock, INTERVAL)
    watcher.startService()
    second = ca.issue(["example.test"])
    certbot.write_archive(second)
    certbot.flip_cert()
    clock.advance(INTERVAL)  # sees the half-done renewal
    certbot.flip_key()
    clock.advance(INTERVAL)
    assert leaf_serial(consumer.got[-1][1]) == leaf_serial(second)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    watcher.stopService()


def test_missing_files_do_not_kill_the_loop(
    tmp_path: Path, ca: TestCA, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    consumer = Recorder()
    watcher = FileWatcher(str(cert), str(key), "main", consumer, clock, INTERVAL, grace=10)
    watcher.startService()
    clock.advance(INTERVAL * 3)
    assert any("cannot stat" in r.getMessage() for r in caplog.records if r.levelno >= 40)
    bundle = ca.issue(["example.test"])
    write(cert, bundle.chain_pem)
    write(key, bundle.key_pem)
    clock.advance(INTERVAL)
    assert [b.chain_pem for _, b in consumer.got] == [bundle.chain_pem]
    watcher.stopService()


def test_garbage_then_good(tmp_path: Path, ca: TestCA, clock: Clock) -> None:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    write(cert, b"garbage")
    write(key, b"garbage")
    consumer = Recorder()
    watcher = FileWatcher(str(cert), str(key), "main", consumer, clock, INTERVAL)
    assert watcher.check() is False
    bundle = ca.issue(["example.test"])
    write(cert, bundle.chain_pem)
    write(key, bundle.key_pem)
    assert watcher.check() is True


def test_consumer_refusal_is_not_retried_until_files_change(
    tmp_path: Path, ca: TestCA, clock: Clock
) -> None:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    good = ca.issue(["example.test"])
    write(cert, good.chain_pem)
    write(key, good.key_pem)
    tls = HotSwapTLS(clock=clock, required_names={"main": ["example.test"]})
    watcher = FileWatcher(str(cert), str(key), "main", tls, clock, INTERVAL)
    watcher.startService()
    wrong = ca.issue(["wrong.test"])
    write(cert, wrong.chain_pem)
    write(key, wrong.key_pem)
    clock.advance(INTERVAL)
    assert tls.current("main") is not None
    assert leaf_serial(tls.current("main")) == leaf_serial(good)  # type: ignore[arg-type]
    watcher.stopService()


def test_force_reload_redelivers(tmp_path: Path, ca: TestCA, clock: Clock) -> None:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    bundle = ca.issue(["example.test"])
    write(cert, bundle.chain_pem)
    write(key, bundle.key_pem)
    consumer = Recorder()
    watcher = FileWatcher(str(cert), str(key), "main", consumer, clock, INTERVAL)
    assert watcher.check() is True
    watcher.reload()
    assert len(consumer.got) == 2


class FakeReactor:
    def __init__(self) -> None:
        self.calls: list[object] = []

    def callFromThread(self, f: object, *args: object, **kw: object) -> None:
        self.calls.append(f)


def test_install_sighup_chains_previous_handler() -> None:
    seen: list[int] = []
    original = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
    try:
        reactor = FakeReactor()
        callback = object.__new__(Recorder).certificate_changed  # any callable will do
        uninstall = install_sighup(reactor, callback)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [callback]
        assert seen == [signal.SIGHUP]
        uninstall()
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [callback]  # ours is gone
        assert seen == [signal.SIGHUP, signal.SIGHUP]  # the previous one is back
    finally:
        signal.signal(signal.SIGHUP, original)
