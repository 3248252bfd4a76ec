"""run --user helpers: user lookup, the store handed to the user, the refusal message."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from synapse_acme import privileges
from synapse_acme.errors import ConfigError


def _someone_else() -> privileges.RunAs:
    me = os.geteuid()
    for entry in pwd.getpwall():
        if entry.pw_uid != me:
            return privileges.resolve(entry.pw_name)
    raise AssertionError("no second user on this system")


def test_resolve_by_name_and_number() -> None:
    root = privileges.resolve("root")
    assert (root.uid, root.gid, root.user) == (0, 0, "root")
    assert privileges.resolve("0") == root
    assert privileges.resolve("root", "0").group == root.group


def test_unknown_user_or_group() -> None:
    with pytest.raises(ConfigError, match="--user: no such user"):
        privileges.resolve("no-such-user-synapse-acme")
    with pytest.raises(ConfigError, match="--group: no such group"):
        privileges.resolve("root", "no-such-group-synapse-acme")


def test_same_user_needs_no_switch() -> None:
    me = privileges.RunAs(user="me", uid=os.geteuid(), gid=os.getegid(), group="g")
    assert privileges.needs_switch(me) is False


def test_storage_of_another_owner_is_refused(tmp_path: Path) -> None:
    other = _someone_else()
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(ConfigError) as info:
        privileges.prepare_storage(str(store), other)
    assert f"chown -R {other.user}:{other.group} {store}" in str(info.value)


def test_storage_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    me = privileges.RunAs(user="me", uid=os.geteuid(), gid=os.getegid(), group="g")
    with pytest.raises(ConfigError, match="expected a directory"):
        privileges.prepare_storage(str(tmp_path / "f"), me)


def test_missing_storage_is_created_private(tmp_path: Path) -> None:
    me = privileges.RunAs(user="me", uid=os.geteuid(), gid=os.getegid(), group="g")
    store = tmp_path / "a" / "store"
    privileges.prepare_storage(str(store), me)
    assert store.is_dir() and (store.stat().st_mode & 0o777) == 0o700
    assert store.stat().st_uid == me.uid
    privileges.prepare_storage(str(store), me)  # existing and ours: fine
