"""Port 80 without running the responder as root, for real: authbind, systemd socket
activation, and root binding then dropping privileges (``run --user``).

Pebble's ``httpPort`` is 80 here: the responder must really own port 80 on 127.0.0.1.
The unprivileged side runs as ``nobody`` through ``setpriv`` and a virtualenv it can read;
the certificate store belongs to that user. Port 80 must be free (checked first).
"""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.deploy.common import (
    SAMPLES,
    Proc,
    check_issued,
    clean_env,
    give_to,
    http,
    owners,
    program,
    require_port_free,
    require_root,
    start_pebble,
    unprivileged_argv,
    unprivileged_python,
    unprivileged_user,
    wait_for,
    world_dir,
)

AUTHBIND_PORT80 = Path("/etc/authbind/byport/80")


@pytest.fixture
def workdir() -> Iterator[Path]:
    require_root()
    require_port_free(80)
    with world_dir("port80") as d:
        yield d


@pytest.fixture
def authbind_port80() -> Iterator[Path]:
    """Restores /etc/authbind/byport/80 to how it was (the test runs the real recipe)."""
    before = AUTHBIND_PORT80.stat() if AUTHBIND_PORT80.exists() else None
    try:
        yield AUTHBIND_PORT80
    finally:
        if before is None:
            AUTHBIND_PORT80.unlink(missing_ok=True)
        else:
            os.chown(AUTHBIND_PORT80, before.st_uid, before.st_gid)
            AUTHBIND_PORT80.chmod(before.st_mode & 0o7777)


def test_authbind(workdir: Path, authbind_port80: Path) -> None:
    user = unprivileged_user()
    names = ["authbind.example.test"]
    ca = start_pebble(workdir, 80)
    try:
        give_to(workdir / "store", user)
        cfg = ca.write_acme_config(
            workdir, names, listener=False, port=80, bind_addresses=["127.0.0.1"]
        )
        # Without authbind the unprivileged user cannot have port 80: the need is real.
        denied = subprocess.run(
            unprivileged_argv(user, "issue", "-c", str(cfg)),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert denied.returncode == 1, denied.stderr
        assert "port 80 on 127.0.0.1 (Permission denied, EACCES)" in denied.stderr, denied.stderr
        assert "acme.port (80)" in denied.stderr and "authbind" in denied.stderr
        # The shipped recipe, then the documented command line.
        setup = subprocess.run(
            ["sh", str(SAMPLES / "authbind-setup.sh"), user.pw_name],
            capture_output=True,
            text=True,
            check=False,
        )
        assert setup.returncode == 0, setup.stderr
        assert authbind_port80.stat().st_uid == user.pw_uid
        r = subprocess.run(
            unprivileged_argv(user, "issue", "-c", str(cfg), wrap=[program("authbind"), "--deep"]),
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(),
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "OK      authbind.example.test" in r.stdout
        check_issued(ca, workdir / "store", names)
        assert owners(workdir / "store") == {user.pw_uid}
    finally:
        ca.stop()


def _activate(workdir: Path, fdname: str | None, user_args: list[str], log: str) -> Proc:
    """``systemd-socket-activate`` binds 127.0.0.1:80 as root and, on the first connection,
    execs the unprivileged command with the socket (LISTEN_FDS)."""
    argv = [program("systemd-socket-activate"), "-l", "127.0.0.1:80"]
    if fdname is not None:
        argv.append(f"--fdname={fdname}")
    proc = Proc([*argv, *user_args], workdir / log, env=clean_env())
    wait_for(lambda: "Listening on" in proc.output(), 10, "systemd-socket-activate to listen")
    return proc


def _poke(port: int = 80) -> socket.socket:
    """The first connection, which makes systemd-socket-activate start the service."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /.well-known/acme-challenge/probe HTTP/1.0\r\nHost: probe\r\n\r\n")
    return s


def _first_issued(store: Path) -> bool:
    """The running service's status file says its first certificate was obtained."""
    try:
        status = json.loads((store / "status.json").read_text())
        return status[0].get("last_success") is not None
    except (OSError, ValueError, IndexError):
        return False


def test_socket_activation_issue(workdir: Path) -> None:
    user = unprivileged_user()
    names = ["socket.example.test", "www.socket.example.test"]
    ca = start_pebble(workdir, 80)
    proc = None
    try:
        give_to(workdir / "store", user)
        cfg = ca.write_acme_config(
            workdir, names, listener=False, listen=["systemd:domain=INET:name=synapse-acme-http"]
        )
        proc = _activate(
            workdir,
            "synapse-acme-http",
            unprivileged_argv(user, "issue", "-c", str(cfg)),
            "activate.log",
        )
        with _poke() as probe:
            # The service adopted the socket: the queued first request gets the responder's 404
            # (an HTTP/1.1 server answers a 1.0 request as HTTP/1.1, RFC 9110 6.2).
            probe.settimeout(30)
            assert probe.recv(100).startswith(b"HTTP/1.1 404 Not Found\r\n")
        code = proc.popen.wait(120)
        out = proc.output()
        assert code == 0, out
        assert "OK      socket.example.test" in out
        assert "HTTP-01 challenge listener on systemd:domain=INET:name=synapse-acme-http" in out
        check_issued(ca, workdir / "store", names)
        assert owners(workdir / "store") == {user.pw_uid}
    finally:
        if proc is not None:
            proc.stop()
        ca.stop()


def test_socket_activation_without_names_fails_clearly(workdir: Path) -> None:
    """Twisted ignores inherited sockets without LISTEN_FDNAMES; say so instead of an
    IndexError (systemd socket units always name them; systemd-socket-activate needs
    --fdname)."""
    user = unprivileged_user()
    ca = start_pebble(workdir, 80)
    proc = None
    try:
        give_to(workdir / "store", user)
        cfg = ca.write_acme_config(
            workdir,
            ["unnamed.example.test"],
            listener=False,
            listen=["systemd:domain=INET:index=0"],
        )
        proc = _activate(
            workdir, None, unprivileged_argv(user, "issue", "-c", str(cfg)), "activate.log"
        )
        _poke().close()
        code = proc.popen.wait(60)
        out = proc.output()
        assert code == 1, out
        assert "no listening socket inherited" in out and "LISTEN_FDNAMES" in out, out
    finally:
        if proc is not None:
            proc.stop()
        ca.stop()


def test_socket_activation_run_with_wrong_family(workdir: Path) -> None:
    """``run`` under socket activation; the config says INET6 but the socket is IPv4, and
    the responder uses the socket's real family."""
    user = unprivileged_user()
    names = ["socketrun.example.test"]
    ca = start_pebble(workdir, 80)
    proc = None
    try:
        give_to(workdir / "store", user)
        cfg = ca.write_acme_config(
            workdir, names, listener=False, listen=["systemd:domain=INET6:name=synapse-acme-http"]
        )
        proc = _activate(
            workdir,
            "synapse-acme-http",
            unprivileged_argv(user, "run", "-c", str(cfg)),
            "activate.log",
        )
        _poke().close()
        wait_for(
            lambda: _first_issued(workdir / "store"),
            60,
            "the socket-activated runner to obtain its certificate",
        )
        check_issued(ca, workdir / "store", names)
        out = proc.output()
        assert "the inherited socket is AF_INET; using that family" in out, out
        assert "host='127.0.0.1', port=80" in out, out
        assert http("http://127.0.0.1/.well-known/acme-challenge/none")[0] == 404
        assert proc.stop() == 0, proc.output()
    finally:
        if proc is not None:
            proc.stop()
        ca.stop()


def _ids(pid: int) -> dict[str, list[int]]:
    fields: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                fields[key] = [int(v) for v in value.split()]
    return fields


def test_root_binds_then_drops_privileges(workdir: Path) -> None:
    """``run --user`` started as root: port 80 bound, then every id is the user's."""
    user = unprivileged_user()
    names = ["drop.example.test"]
    ca = start_pebble(workdir, 80)
    proc = None
    try:
        # The store does not exist yet: the runner creates it for the user.
        cfg = ca.write_acme_config(
            workdir, names, listener=False, port=80, bind_addresses=["127.0.0.1"]
        )
        proc = Proc(
            [
                unprivileged_python(),
                "-m",
                "synapse_acme",
                "run",
                "-c",
                str(cfg),
                "--user",
                user.pw_name,
            ],
            workdir / "run.log",
            env=clean_env(),
        )
        wait_for(
            lambda: _first_issued(workdir / "store"),
            60,
            "the runner to obtain its certificate:\n" + proc.output(),
        )
        ids = _ids(proc.popen.pid)
        assert ids["Uid"] == [user.pw_uid] * 4 and ids["Gid"] == [user.pw_gid] * 4, ids
        assert 0 not in ids["Groups"], ids
        listening = subprocess.run(
            ["ss", "-ltnpH", "sport = :80"], capture_output=True, text=True, check=True
        ).stdout
        assert f"pid={proc.popen.pid}," in listening, listening
        check_issued(ca, workdir / "store", names)
        assert owners(workdir / "store") == {user.pw_uid}
        assert "Running as " + user.pw_name in proc.output()
        assert proc.stop() == 0, proc.output()
    finally:
        if proc is not None:
            proc.stop()
        ca.stop()


def test_privilege_drop_refuses_foreign_storage(workdir: Path) -> None:
    user = unprivileged_user()
    (workdir / "store").mkdir(mode=0o700)  # root's
    cfg = workdir / "acme.yaml"
    cfg.write_text(
        "acme:\n  enabled: true\n  domain: x.example.test\n  terms_of_service_agreed: true\n"
        f"  storage: {workdir / 'store'}\n  port: 80\n"
    )
    r = subprocess.run(
        [
            unprivileged_python(),
            "-m",
            "synapse_acme",
            "run",
            "-c",
            str(cfg),
            "--user",
            user.pw_name,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert r.returncode == 2, r.stderr
    assert f"chown -R {user.pw_name}:{grp.getgrgid(user.pw_gid).gr_name}" in r.stderr, r.stderr
    assert sorted(os.listdir(workdir / "store")) == []  # checked before anything was written
