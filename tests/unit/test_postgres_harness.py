"""The PostgreSQL test harness finds Debian's programs off PATH and fails clearly without them
(the tests that need a server then fail, never skip)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synapse_acme.testing import postgres
from synapse_acme.testing.postgres import PostgresError, find_binary


def _fake_bin(root: Path, version: str, name: str) -> str:
    directory = root / version / "bin"
    directory.mkdir(parents=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    os.chmod(path, 0o755)
    return str(path)


def test_the_newest_debian_version_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bin(tmp_path, "9.6", "initdb")
    newest = _fake_bin(tmp_path, "15", "initdb")
    _fake_bin(tmp_path, "13", "initdb")
    monkeypatch.setattr(postgres, "DEBIAN_BIN_GLOB", str(tmp_path / "*" / "bin"))
    assert find_binary("initdb") == newest


def test_a_missing_program_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "DEBIAN_BIN_GLOB", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresError) as info:
        find_binary("initdb")
    assert "'initdb' not found" in str(info.value)
    assert "apt-get install -y postgresql" in str(info.value)


def test_database_names_are_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        postgres.PostgresServer().create_database("x; DROP DATABASE postgres")
