"""fsutil: atomic, private writes and permission checks."""

from __future__ import annotations

import errno
import os
import pwd
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from synapse_acme import fsutil
from synapse_acme.errors import StoreError


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fsutil.atomic_write(str(p), b"one")
    assert p.read_bytes() == b"one" and _mode(p) == 0o600
    fsutil.atomic_write(str(p), b"two", 0o644)
    assert p.read_bytes() == b"two" and _mode(p) == 0o644
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_mode_is_exact_despite_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fsutil.atomic_write(str(tmp_path / "c"), b"x", 0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "c") == 0o644


def test_key_file_is_never_world_readable_even_briefly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & os.O_CREAT:
            seen.append(mode)
            assert flags & os.O_EXCL
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    fsutil.atomic_write(str(tmp_path / "k"), b"secret")
    assert seen == [0o600]


def test_partial_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def one_byte(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", one_byte)
    fsutil.atomic_write(str(tmp_path / "f"), b"hello world")
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"hello world"


@pytest.mark.parametrize(
    ("target", "code", "text"),
    [
        ("write", errno.ENOSPC, "No space left on device (ENOSPC)"),
        ("fsync", errno.ENOSPC, "No space left on device (ENOSPC)"),
        ("rename", errno.EROFS, "Read-only file system (EROFS)"),
        ("write", errno.EIO, "(EIO)"),
    ],
)
def test_atomic_write_failure_keeps_old_and_names_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, code: int, text: str
) -> None:
    p = tmp_path / "f"
    fsutil.atomic_write(str(p), b"old")

    def fail(*args: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, target, fail)
    with pytest.raises(StoreError) as e:
        fsutil.atomic_write(str(p), b"new")
    monkeypatch.undo()
    assert str(p) in str(e.value) and text in str(e.value)
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]  # temp file removed


def test_atomic_write_into_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="ENOENT"):
        fsutil.atomic_write(str(tmp_path / "nope" / "f"), b"x")


def test_create_exclusive(tmp_path: Path) -> None:
    p = tmp_path / "k"
    assert fsutil.create_exclusive(str(p), b"first") is True
    assert fsutil.create_exclusive(str(p), b"second") is False
    assert p.read_bytes() == b"first" and _mode(p) == 0o600
    assert os.listdir(tmp_path) == ["k"]


def test_create_exclusive_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    p = tmp_path / "k"
    assert fsutil.create_exclusive(str(p), b"first") is True
    assert fsutil.create_exclusive(str(p), b"second") is False
    assert p.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["k"]


def test_create_exclusive_failure_is_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(StoreError, match="ENOSPC"):
        fsutil.create_exclusive(str(tmp_path / "k"), b"x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_check_mode(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"x")
    os.chmod(p, 0o600)
    assert fsutil.check_mode(str(p), 0o600) == []
    os.chmod(p, 0o400)
    assert fsutil.check_mode(str(p), 0o600) == []  # stricter is fine
    os.chmod(p, 0o644)
    [warning] = fsutil.check_mode(str(p), 0o600)
    assert str(p) in warning and "0644" in warning and "chmod 0600" in warning
    assert fsutil.check_mode(str(tmp_path / "missing"), 0o600) == []


def test_ensure_private_dir_creates_0700(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    old = os.umask(0o022)
    try:
        assert fsutil.ensure_private_dir(str(d)) == []
    finally:
        os.umask(old)
    assert d.is_dir() and _mode(d) == 0o700
    assert fsutil.ensure_private_dir(str(d)) == []  # idempotent


def test_ensure_private_dir_fixes_or_reports_loose_dir(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    [report] = fsutil.ensure_private_dir(str(d), fix=False)
    assert "0755" in report and _mode(d) == 0o755
    [fixed] = fsutil.ensure_private_dir(str(d))
    assert "tightened" in fixed and _mode(d) == 0o700


def test_ensure_private_dir_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(StoreError, match="not one"):
        fsutil.ensure_private_dir(str(f))
    with pytest.raises(StoreError, match="cannot create directory"):
        fsutil.ensure_private_dir(str(f / "sub"))


def test_describe_os_error() -> None:
    assert fsutil.describe_os_error(OSError(errno.EACCES, "Permission denied")) == (
        "Permission denied (EACCES)"
    )
    assert fsutil.describe_os_error(OSError("weird")) == "weird"


# -- files as somebody else may have left them ------------------------------------------------


def test_read_regular_reads_plain_files_and_reports_absent(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 30000)
    assert fsutil.read_regular(str(p)) == b"abc" * 30000
    assert fsutil.read_regular(str(tmp_path / "missing")) is None
    with pytest.raises(StoreError, match="larger than 100 bytes"):
        fsutil.read_regular(str(p), limit=100)


def test_read_regular_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "privkey.pem"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match=r"privkey.pem: it is a FIFO \(named pipe\)"):
        fsutil.read_regular(str(fifo))  # a blocking open() would hang here forever


def test_read_regular_refuses_symlinks_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(StoreError, match="it is a symbolic link"):
        fsutil.read_regular(str(link))
    assert fsutil.read_regular(str(link), follow=True) == b"secret"


def test_open_regular_refuses_directories_and_devices(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="it is a directory"):
        fsutil.open_regular(str(tmp_path))
    with pytest.raises(StoreError, match="it is a character device"):
        fsutil.open_regular("/dev/null", follow=True)


def test_check_owned_by_us(tmp_path: Path) -> None:
    fsutil.check_owned_by_us(str(tmp_path), "storage")  # ours: fine
    fsutil.check_owned_by_us(str(tmp_path / "missing"), "storage")  # created later as ours
    if os.geteuid() != 0:
        return  # only root can make a directory that belongs to somebody else
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    link = tmp_path / "link"
    link.symlink_to(other)
    owner = pwd.getpwuid(65534).pw_name
    me = pwd.getpwuid(os.geteuid()).pw_name
    with pytest.raises(StoreError) as err:
        fsutil.check_owned_by_us(str(other), "storage")
    assert f"storage {other} belongs to {owner} (uid 65534), not to {me} (uid 0)" in str(err.value)
    # The commands in the hint can be pasted as they are.
    assert f"`synapse-acme run --user {owner}`" in str(err.value)
    assert f"`chown -R {me} {other}`" in str(err.value)
    with pytest.raises(StoreError) as err:
        fsutil.check_owned_by_us(str(link), "storage")
    assert f"it is a symbolic link to {other}" in str(err.value)
    assert f"`chown -R {me} {other}`" in str(err.value)  # the target, not the link


def test_tighten_goes_through_a_descriptor_and_never_follows_a_swapped_link(
    tmp_path: Path,
) -> None:
    key = tmp_path / "privkey.pem"
    key.write_bytes(b"k")
    os.chmod(key, 0o666)
    assert fsutil.tighten(str(key), 0o600) == 0o666
    assert _mode(key) == 0o600
    assert fsutil.tighten(str(key), 0o600) is None  # already tight: nothing done
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    os.chmod(victim, 0o644)
    link = tmp_path / "swapped"
    link.symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        fsutil.tighten(str(link), 0o600)
    assert _mode(victim) == 0o644  # the link's target was not touched
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    dlink = tmp_path / "dlink"
    dlink.symlink_to(d)
    with pytest.raises(OSError):
        fsutil.tighten(str(dlink), 0o700, directory=True)
    assert fsutil.tighten(str(dlink), 0o700, directory=True, follow=True) == 0o755


def test_fsync_all_syncs_every_path_and_reports_a_failure_after_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x")
        paths.append(str(tmp_path / name))
    paths.append(str(tmp_path))  # a directory too
    synced: list[int] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    fsutil.fsync_all(paths)
    assert sorted(synced) == sorted(os.stat(p).st_ino for p in paths)

    failing = os.stat(paths[1]).st_ino
    synced.clear()

    def one_fails(fd: int) -> None:
        ino = os.fstat(fd).st_ino
        synced.append(ino)
        if ino == failing:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", one_fails)
    with pytest.raises(OSError) as info:
        fsutil.fsync_all(paths)
    assert info.value.errno == errno.EIO
    assert len(synced) == len(paths)  # the others were still made durable


def test_fsync_all_with_more_paths_than_threads_syncs_each_once_with_bounded_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for i in range(4 * fsutil.FSYNC_THREADS + 3):
        (tmp_path / f"f{i}").write_bytes(b"x")
        paths.append(str(tmp_path / f"f{i}"))
    synced: list[int] = []
    threads: set[int] = set()
    running = [0, 0]  # now, most at once
    lock = threading.Lock()
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        with lock:
            running[0] += 1
            running[1] = max(running)
            synced.append(os.fstat(fd).st_ino)
            threads.add(threading.get_ident())
        time.sleep(0.002)  # long enough for the threads to overlap
        real_fsync(fd)
        with lock:
            running[0] -= 1

    monkeypatch.setattr(os, "fsync", recording)
    fsutil.fsync_all(paths)
    assert sorted(synced) == sorted(os.stat(p).st_ino for p in paths)  # each exactly once
    assert 1 < len(threads) <= fsutil.FSYNC_THREADS
    assert 1 < running[1] <= fsutil.FSYNC_THREADS
