"""One manager per store (a real flock across real processes) and the renew-request hand-off."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from synapse_acme import interprocess
from synapse_acme.errors import StoreBusy, StoreError
from synapse_acme.interprocess import RenewRequestWatcher, StoreLock

HOLDER = """
import sys, time
from synapse_acme.interprocess import StoreLock
lock = StoreLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _holder(storage: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(storage)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read() if proc.stderr else ""
    return proc


def test_second_process_is_refused_with_the_holders_pid_until_it_dies(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(StoreBusy) as busy:
            StoreLock.acquire(str(tmp_path))
        assert busy.value.pid == proc.pid and busy.value.storage == str(tmp_path)
        message = str(busy.value)
        assert f"pid {proc.pid}" in message and str(tmp_path) in message
        assert "renew --force" in message
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        proc.wait(10)
    lock = StoreLock.acquire(str(tmp_path))
    try:
        assert lock.held
        assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE((tmp_path / "lock").stat().st_mode) == 0o600
    finally:
        lock.release()


def test_same_process_twice_is_busy_and_release_frees(tmp_path: Path) -> None:
    first = StoreLock.acquire(str(tmp_path))
    with pytest.raises(StoreBusy) as busy:
        StoreLock.acquire(str(tmp_path))
    assert busy.value.pid == os.getpid()
    first.release()
    first.release()  # idempotent
    assert not first.held
    # The file stays (unlinking it would race a new acquirer); the lock is free again.
    assert (tmp_path / "lock").exists()
    StoreLock.acquire(str(tmp_path)).release()


def test_missing_storage_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as err:
        StoreLock.acquire(str(tmp_path / "nope"))
    assert not isinstance(err.value, StoreBusy)
    assert str(tmp_path / "nope" / "lock") in str(err.value) and "ENOENT" in str(err.value)


def test_filesystem_without_locks_runs_unprotected_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(interprocess.fcntl, "flock", no_locks)
    lock = StoreLock.acquire(str(tmp_path))
    assert not lock.held
    lock.release()
    assert "cannot lock files" in caplog.text and "ENOLCK" in caplog.text


class _Acme:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, bool]] = []
        self.requested_at: list[float | None] = []

    def renew(
        self, key: Any = None, force: bool = False, requested_at: float | None = None
    ) -> defer.Deferred[list[Any]]:
        self.calls.append((key, force))
        self.requested_at.append(requested_at)
        return defer.succeed([])


def test_renew_request_file_forces_one_renewal_per_request(tmp_path: Path) -> None:
    clock, acme = Clock(), _Acme()
    watcher = RenewRequestWatcher(str(tmp_path), acme, clock)
    watcher.startService()
    assert acme.calls == []
    path = interprocess.request_renewal(str(tmp_path))
    assert path == str(tmp_path / "renew-request")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    asked_at = os.stat(path).st_mtime
    clock.advance(interprocess.RENEW_REQUEST_POLL)
    assert acme.calls == [(None, True)] and not os.path.exists(path)
    assert acme.requested_at == [asked_at]  # a certificate issued since answers it
    clock.advance(interprocess.RENEW_REQUEST_POLL * 3)
    assert acme.calls == [(None, True)]
    watcher.stopService()
    interprocess.request_renewal(str(tmp_path))
    clock.advance(interprocess.RENEW_REQUEST_POLL * 3)
    assert acme.calls == [(None, True)]  # stopped: the request waits for the next manager
    assert os.path.exists(path)
