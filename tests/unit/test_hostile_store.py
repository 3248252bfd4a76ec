"""A store that somebody else prepared: a symlink or a FIFO at the lock, a storage directory
(or a link to one) that belongs to another user. Each is refused with a clear StoreError
before anything is opened for writing, chmod-ed or created in it.

Giving files to another user needs root; the test suite runs as root (see the deploy tests).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from synapse_acme import privileges
from synapse_acme.config import AcmeConfig
from synapse_acme.errors import StoreError
from synapse_acme.interprocess import StoreLock, StoreLockService
from synapse_acme.runtime import Runtime, build_runtime
from tests.hang import deadline

NOBODY = 65534


def _config(storage: Path, account_key_file: Path | None = None) -> AcmeConfig:
    key = account_key_file if account_key_file is not None else storage / "account.key"
    return AcmeConfig(
        enabled=True,
        domain="a.example.test",
        storage=str(storage),
        account_key_file=str(key),
        port=0,
    )


def _build(config: AcmeConfig) -> Runtime:
    # No network and no listener: build only (nothing is started).
    return build_runtime(config, Clock(), standalone_listener=False, http_client=object())


def _release(runtime: Runtime) -> None:
    for child in runtime.service:
        if isinstance(child, StoreLockService):
            child.lock.release()


def _snapshot(path: Path) -> tuple[int, int, list[str]]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, sorted(os.listdir(path))


def _require_root() -> None:
    assert os.geteuid() == 0, "these tests give files to another user: run them as root"


# -- the lock file ---------------------------------------------------------------------------


def test_symlink_at_the_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o644)
    storage = tmp_path / "store"
    storage.mkdir(mode=0o700)
    (storage / "lock").symlink_to(victim)
    with pytest.raises(StoreError) as err:
        StoreLock.acquire(str(storage))
    assert f"refusing to open {storage / 'lock'}: it is a symbolic link" in str(err.value)
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    # A dangling link: nothing is created at its target either.
    (storage / "lock").unlink()
    (storage / "lock").symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(StoreError, match="symbolic link"):
        StoreLock.acquire(str(storage))
    assert not (tmp_path / "created-through-the-link").exists()


def test_fifo_at_the_lock_is_refused_without_blocking(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    storage.mkdir(mode=0o700)
    os.mkfifo(storage / "lock")
    with deadline(10), pytest.raises(StoreError) as err:
        StoreLock.acquire(str(storage))
    assert f"refusing to use {storage / 'lock'}: it is a FIFO" in str(err.value)


def test_directory_at_the_lock_is_refused(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    (storage / "lock").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"cannot open .*lock: Is a directory \(EISDIR\)"):
        StoreLock.acquire(str(storage))


def test_symlink_at_the_lock_is_refused_by_a_whole_build(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    storage = tmp_path / "store"
    storage.mkdir(mode=0o700)
    (storage / "lock").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        _build(_config(storage))
    assert victim.read_bytes() == b"precious\n"
    assert sorted(os.listdir(storage)) == ["lock"]  # no account key, nothing else


# -- the storage directory of another user ---------------------------------------------------


def test_storage_of_another_user_is_refused_before_any_change(tmp_path: Path) -> None:
    _require_root()
    storage = tmp_path / "store"
    storage.mkdir()
    os.chmod(storage, 0o755)  # looser than 0700: a build would normally tighten it
    os.chown(storage, NOBODY, NOBODY)
    before = _snapshot(storage)
    with pytest.raises(StoreError) as err:
        _build(_config(storage))
    owner = pwd.getpwuid(NOBODY).pw_name
    message = str(err.value)
    assert f"the storage directory {storage} belongs to {owner} (uid {NOBODY})" in message
    assert f"--user {owner}" in message and f"chown -R root {storage}" in message
    assert _snapshot(storage) == before == (0o755, NOBODY, [])  # mode, owner, contents


def test_symlink_to_a_storage_of_another_user_is_refused(tmp_path: Path) -> None:
    _require_root()
    real = tmp_path / "real-store"
    real.mkdir()
    os.chmod(real, 0o750)
    os.chown(real, NOBODY, NOBODY)
    link = tmp_path / "store"
    link.symlink_to(real)
    before = _snapshot(real)
    with pytest.raises(StoreError) as err:
        _build(_config(link))
    assert f"it is a symbolic link to {real}" in str(err.value)
    assert _snapshot(real) == before == (0o750, NOBODY, [])


def test_symlink_to_our_own_storage_is_fine(tmp_path: Path) -> None:
    real = tmp_path / "real-store"
    real.mkdir()
    link = tmp_path / "store"
    link.symlink_to(real)
    runtime = _build(_config(link))
    try:
        assert (real / "account.key").exists() and (real / "lock").exists()
    finally:
        _release(runtime)


def test_account_key_of_another_user_is_refused_by_a_build(tmp_path: Path) -> None:
    _require_root()
    storage = tmp_path / "store"
    storage.mkdir(mode=0o700)
    key = tmp_path / "foreign.key"
    key.write_bytes(b"not even read")
    os.chmod(key, 0o644)
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=rf"the account key {key} belongs to .*uid {NOBODY}"):
        _build(_config(storage, account_key_file=key))
    assert stat.S_IMODE(key.stat().st_mode) == 0o644 and key.read_bytes() == b"not even read"


def test_run_user_path_still_builds_as_the_user() -> None:
    """`run --user`: root hands a new store to the user, then builds as that user; the
    ownership check sees the user's effective uid, so the store is accepted."""
    _require_root()
    run_as = privileges.resolve(pwd.getpwuid(NOBODY).pw_name)
    # pytest's tmp_path is root's 0700: the user could not even reach the store in it.
    parent = Path(tempfile.mkdtemp(prefix="synapse-acme-hostile-", dir="/tmp"))
    try:
        parent.chmod(0o755)
        storage = parent / "store"
        privileges.prepare_storage(str(storage), run_as)
        runtime = privileges.as_user(run_as, _build, _config(storage))
        try:
            owners = {os.lstat(p).st_uid for p in [storage, *storage.iterdir()]}
            assert owners == {NOBODY}
            assert sorted(os.listdir(storage)) == ["account.key", "lock"]
        finally:
            _release(runtime)
    finally:
        shutil.rmtree(parent)
