"""Fault matrix, disk side: a REAL small tmpfs the test mounts (root needed), filled to the last
page, and remounted read-only, under the real FileStore and service (Clock-driven).

The issuer is the in-memory fake here: the fault is the disk, and the point is that an issued
certificate that cannot be saved is kept in memory and saved later, never ordered again.
"""

from __future__ import annotations

import datetime
import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_acme import fsutil
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.status import CertificateStatus
from synapse_acme.store import FileStore
from synapse_acme.testing.issuer import FakeIssuer
from tests.certs import TestCA

START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ("disk.example.test",)
KEY = names_key(NAMES)
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64-page tmpfs mounted for this test only. Fails (never skips) where mounting is
    impossible, showing the error: this row of the matrix needs root or CAP_SYS_ADMIN."""
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={64 * PAGE},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, f"cannot mount a tmpfs (root needed): {r.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave_pages: int) -> Path:
    """Fill the filesystem to the last page, then free exactly ``leave_pages`` pages."""
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * PAGE)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        size = f.seek(0, os.SEEK_END)
        while os.statvfs(mnt).f_bavail < leave_pages:
            size -= PAGE
            f.truncate(size)
    assert os.statvfs(mnt).f_bavail == leave_pages
    return filler


class World:
    def __init__(self, root: Path) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.ca = TestCA(now=START)
        self.store = FileStore(str(root))
        self.old = self.ca.issue(
            list(NAMES),
            not_before=START - datetime.timedelta(days=80),
            not_after=START + datetime.timedelta(days=10),
        )
        self.store.save(KEY, self.old)
        self.issuer = FakeIssuer(ca=self.ca, clock=self.clock)
        self.service = AcmeService(
            [CertificateSpec(names=NAMES)], self.store, self.issuer, self.clock, check_jitter=0.0
        )

    @property
    def m(self) -> CertificateStatus:
        return self.service.status_of(KEY)

    def until_retry(self) -> float:
        """Seconds until the next attempt in force (0 if none is scheduled)."""
        at = self.m.next_attempt
        return 0.0 if at is None else max(0.0, at.timestamp() - self.clock.seconds())

    def served(self) -> bytes:
        bundle = self.service.current(KEY)
        assert bundle is not None
        return bundle.chain_pem

    def on_disk(self) -> CertificateBundle:
        out: list[Any] = []
        FileStore(self.store.root, auto_recover=False).load(KEY).addBoth(out.append)
        assert isinstance(out[0], CertificateBundle), out[0]
        return out[0]

    def leftovers(self) -> list[str]:
        return [n for n in os.listdir(self.store.certificates_dir) if "~" in n]


def _check_failed_save(w: World, reason: str) -> None:
    assert w.m.failures == 1 and w.m.unsaved
    assert reason in (w.m.last_error or ""), w.m.last_error
    assert w.served() == w.old.chain_pem  # the old certificate keeps serving
    disk = w.on_disk()
    assert disk.chain_pem == w.old.chain_pem and disk.key_pem == w.old.key_pem
    assert w.leftovers() == []  # the half-written staging directory was removed


def _check_recovered(w: World) -> None:
    w.clock.advance(w.until_retry() + 0.001)  # status times are in microseconds
    assert w.m.failures == 0 and not w.m.unsaved, w.m.last_error
    assert len(w.issuer.calls) == 1  # saved later, not ordered again
    assert w.served() != w.old.chain_pem
    assert w.on_disk().chain_pem == w.served()
    assert w.leftovers() == []


@pytest.mark.parametrize(
    ("free_pages", "fails_at"),
    [(0, "privkey.pem"), (1, "fullchain.pem"), (2, "metadata.json")],
)
def test_disk_full_during_save(
    tmpfs: Path, free_pages: int, fails_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmpfs / "store")
    filler = fill(tmpfs, free_pages)
    writes: list[tuple[str, str]] = []
    real = fsutil.write_new_file

    def recording(path: str, data: bytes, mode: int = 0o600, *, sync: bool = True) -> None:
        try:
            real(path, data, mode, sync=sync)
        except OSError as e:
            writes.append((os.path.basename(path), errno.errorcode[e.errno or 0]))
            raise
        writes.append((os.path.basename(path), "ok"))

    monkeypatch.setattr(fsutil, "write_new_file", recording)
    w.service.startService()
    w.clock.advance(0)
    assert len(w.issuer.calls) == 1
    assert writes[-1] == (fails_at, "ENOSPC"), writes  # the disk filled at this very file
    _check_failed_save(w, "No space left on device (ENOSPC)")
    filler.unlink()  # space returns
    _check_recovered(w)


def test_read_only_store_during_save(tmpfs: Path) -> None:
    w = World(tmpfs / "store")
    r = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    w.service.startService()
    w.clock.advance(0)
    _check_failed_save(w, "Read-only file system (EROFS)")
    r = subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_recovered(w)
