"""The operator's first hour: every command does what README.md and docs/ say, or says why not.

Each test runs the real ``synapse-acme`` command line in a subprocess (Pebble as the CA where an
order could happen) and checks what an operator sees and what is left on disk: the exit code
(cli.py: 0 ok, 1 failed, 2 configuration/usage), the one message naming the key, its value and
the fix, the files written or (mostly) not written, and never a Python traceback.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from synapse_acme import crypto
from synapse_acme.config import MODULE_NAME
from synapse_acme.names import names_key
from synapse_acme.testing.pebble import PebbleCA
from tests.certs import TestCA
from tests.integration.deploy.common import (
    as_user_argv,
    unprivileged_python,
    unprivileged_user,
    world_dir,
)

CLI = [sys.executable, "-m", "synapse_acme"]


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 120, prefix: Sequence[str] = CLI
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def tree(path: Path) -> list[str]:
    """Every path below ``path``, relative: what a command left behind."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def block(ca: PebbleCA, directory: Path, names: Sequence[str], **extra: Any) -> dict[str, Any]:
    """An acme: block for ``ca`` (as PebbleCA.write_acme_config writes it), as a dict."""
    written = ca.write_acme_config(directory, names, **extra)
    config: dict[str, Any] = yaml.safe_load(written.read_text())["acme"]
    written.unlink()
    return config


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


# -- 1. enabled: false --------------------------------------------------------------------------


def test_enabled_false_in_a_standalone_file_requests_and_writes_nothing(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    cfg = pebble.write_acme_config(tmp_path, ["off.example.test"], enabled=False)
    for command in (["issue"], ["renew"], ["renew", "--force"], ["run"]):
        r = cli(*command, "-c", str(cfg), timeout=60)
        assert r.returncode == 2, (command, r.stderr)
        assert r.stderr.startswith(f"configuration error: acme.enabled: false in {cfg}: ")
        assert f"`synapse-acme {command[0]}` requested nothing and wrote nothing" in r.stderr
        assert "set `enabled: true` in that block" in r.stderr
        assert r.stdout == ""
        # No store, so no account key and no order: Pebble was not asked for anything.
        assert tree(tmp_path) == ["acme.yaml"], command
    # status still reads (there is nothing), and says why nothing will be issued.
    r = cli("status", "-c", str(cfg))
    assert r.returncode == 1 and "state:        missing" in r.stdout
    assert "note: acme.enabled is false" in r.stderr
    assert tree(tmp_path) == ["acme.yaml"]


def test_enabled_false_at_the_top_of_homeserver_yaml_leaves_the_homeserver_files_alone(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    cert, key = tmp_path / "hs.tls.crt", tmp_path / "hs.tls.key"
    cert.write_text("the homeserver's certificate\n")
    key.write_text("the homeserver's key\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cert, key)}
    acme = block(pebble, tmp_path, ["hs.example.test"], enabled=False)
    del acme["storage"]  # the default: acme/ next to homeserver.yaml
    hs = write_yaml(
        tmp_path / "homeserver.yaml",
        {
            "server_name": "hs.example.test",
            "tls_certificate_path": str(cert),
            "tls_private_key_path": str(key),
            "acme": acme,
        },
    )
    for command in ("issue", "renew", "run"):
        r = cli(command, "-c", str(hs), timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"acme.enabled: false in {hs}" in r.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cert, key)} == before
    assert not (tmp_path / "acme").exists()


def test_module_config_enabled_false_is_refused_and_listing_the_module_opts_in(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    config = block(pebble, tmp_path, ["mod.example.test"], enabled=False)
    hs_doc: dict[str, Any] = {
        "server_name": "mod.example.test",
        "modules": [{"module": "other.Module"}, {"module": MODULE_NAME, "config": config}],
    }
    hs = write_yaml(tmp_path / "homeserver.yaml", hs_doc)
    r = cli("issue", "-c", str(hs))
    assert r.returncode == 2
    assert f"modules[1].config.enabled: false in {hs}" in r.stderr
    assert "remove `enabled: false` there (listed as a module, it defaults to true)" in r.stderr
    assert not (tmp_path / "store").exists()
    # Without the key, the module's default applies here too: listing it is the opt-in.
    del config["enabled"]
    write_yaml(hs, hs_doc)
    r = cli("issue", "-c", str(hs))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK      mod.example.test: certificate in ")


# -- 2. tracebacks ------------------------------------------------------------------------------


def test_the_unedited_sample_says_what_to_edit_and_writes_nothing(tmp_path: Path) -> None:
    sample = cli("generate-config").stdout
    cfg = tmp_path / "acme.yaml"
    cfg.write_text(sample)
    for command in ("issue", "renew", "run"):
        r = cli(command, "-c", str(cfg), cwd=tmp_path, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"acme.enabled: false in {cfg}" in r.stderr
        assert "set `enabled: true` in that block and set acme.domain" in r.stderr
        assert tree(tmp_path) == ["acme.yaml"]  # no acme/, no account key
    # Half edited: enabled, but no name to certify. Still nothing is written.
    cfg.write_text(sample.replace("  enabled: false", "  enabled: true"))
    r = cli("issue", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("configuration error: acme.domain: not set")
    assert tree(tmp_path) == ["acme.yaml"]


def test_generate_config_never_overwrites_a_file_without_force(tmp_path: Path) -> None:
    sample = cli("generate-config").stdout
    existing = tmp_path / "existing.yaml"
    existing.write_text("mine\n")
    r = cli("generate-config", "-o", str(existing))
    assert r.returncode == 2
    assert r.stderr == (
        f"error: {existing} already exists and was left as it is: give another path with -o, "
        "remove the file first, or add --force to replace it\n"
    )
    assert existing.read_text() == "mine\n"
    r = cli("generate-config", "-o", str(existing), "--force")
    assert r.returncode == 0 and existing.read_text() == sample
    fresh = tmp_path / "fresh.yaml"
    assert cli("generate-config", "-o", str(fresh)).returncode == 0
    assert fresh.read_text() == sample
    r = cli("generate-config", "-o", str(tmp_path / "no" / "such" / "dir.yaml"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: cannot write ") and "(ENOENT)" in r.stderr


def _into_closed_pipe(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdout a pipe whose reader is already gone: every write fails EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run(
            [*CLI, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    return subprocess.CompletedProcess(r.args, r.returncode, "", r.stderr)


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path: Path) -> None:
    names = [[f"n{i}.pipe.example.test"] for i in range(40)]
    acme = {
        "enabled": True,
        "domain": "first.pipe.example.test",
        "certificates": [{"domains": n} for n in names],
        "storage": str(tmp_path / "store"),
    }
    cfg = write_yaml(tmp_path / "acme.yaml", {"acme": acme})
    for args, code in (
        (["status", "-c", str(cfg)], 1),  # every certificate is missing: status says 1
        (["status", "-c", str(cfg), "--json"], 1),
        (["generate-config"], 0),
        (["--help"], 0),
        (["issue", "--help"], 0),
    ):
        r = _into_closed_pipe(args)
        assert r.returncode == code, (args, r.stderr)
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
        assert "Exception ignored" not in r.stderr, r.stderr
    # And through a real shell pipeline, as an operator types it.
    script = f'{" ".join(CLI)} status -c {cfg} | head -1; echo "exit ${{PIPESTATUS[0]}}"'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["first.pipe.example.test", "exit 1"], r.stdout
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


# -- 3. no order while the challenge cannot be answered -----------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port this test holds (bound to port 0, so no race with anyone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_no_order_when_the_challenge_port_is_taken(
    pebble: PebbleCA, tmp_path: Path, taken_port: int
) -> None:
    names = ["taken.example.test"]
    cfg = pebble.write_acme_config(tmp_path, names, port=taken_port)
    for command in ("issue", "run"):
        r = cli(command, "-c", str(cfg), timeout=60)
        assert r.returncode == 1, r.stderr
        error = r.stderr.splitlines()[-1]
        assert error.startswith("error: could not open any HTTP-01 challenge listener: ")
        assert f"port {taken_port} on 127.0.0.1 (Address already in use, EADDRINUSE)" in error
        assert f"These come from acme.port ({taken_port}) and acme.bind_addresses" in error
        assert "Let it forward /.well-known/acme-challenge to synapse-acme" in error
        assert error.endswith("Nothing was ordered from the CA")
        assert "interface=" not in error
        # No registration (account.json) means no request reached newAccount or newOrder.
        assert not (tmp_path / "store" / "account.json").exists()
        assert not list((tmp_path / "store").glob("certificates/*"))
        assert "Obtaining a certificate" not in r.stderr
    # The same through listen:, named as such.
    listen = f"tcp:{taken_port}:interface=127.0.0.1"
    cfg = pebble.write_acme_config(tmp_path, names, listener=False, listen=[listen])
    r = cli("run", "-c", str(cfg), timeout=60)
    assert r.returncode == 1 and f"These come from acme.listen ({listen})" in r.stderr
    assert not (tmp_path / "store" / "account.json").exists()


def test_a_taken_tls_port_is_named_too(pebble: PebbleCA, tmp_path: Path, taken_port: int) -> None:
    listen = f"tcp:{taken_port}:interface=127.0.0.1"
    cfg = pebble.write_acme_config(tmp_path, ["tls.example.test"], tls_listen=[listen])
    r = cli("run", "-c", str(cfg), timeout=60)
    assert r.returncode == 1, r.stderr
    assert (
        f"error: could not open any TLS listener: port {taken_port} on 127.0.0.1 (Address "
        f"already in use, EADDRINUSE). These come from acme.tls_listen ({listen})"
    ) in r.stderr
    assert not (tmp_path / "store" / "account.json").exists()


@pytest.fixture(scope="module")
def nobody() -> Iterator[tuple[pwd.struct_passwd, list[str]]]:
    """The unprivileged user and the command that runs synapse-acme as that user: this checkout
    with this Python if the user can read them, else a world-readable copy (deploy tests')."""
    user = unprivileged_user()
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    probe = [*as_user_argv(user), sys.executable, "-c", "import synapse_acme.cli"]
    ok = subprocess.run(probe, capture_output=True, env={**os.environ, **env}, check=False)
    if ok.returncode == 0:
        yield user, [*as_user_argv(user), sys.executable, "-m", "synapse_acme"]
    else:
        yield user, [*as_user_argv(user), unprivileged_python(), "-m", "synapse_acme"]


def test_port_80_without_privileges_names_the_setting_and_every_way_out(
    pebble: PebbleCA, nobody: tuple[pwd.struct_passwd, list[str]]
) -> None:
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        start = int(f.read())
    assert start > 80, f"net.ipv4.ip_unprivileged_port_start is {start}: port 80 is not privileged"
    user, as_nobody = nobody
    with world_dir("first-hour-80") as d:
        ca_bundle = d / "pebble-ca.pem"
        shutil.copy(pebble.ca_bundle, ca_bundle)
        ca_bundle.chmod(0o644)
        roots = d / "pebble-roots.pem"
        shutil.copy(pebble.issuer_roots, roots)
        roots.chmod(0o644)
        acme = block(
            pebble, d, ["eighty.example.test"], ca_bundle=str(ca_bundle), issuer_roots=str(roots)
        )
        del acme["port"], acme["bind_addresses"]  # the defaults: port 80 on :: and 0.0.0.0
        cfg = write_yaml(d / "acme.yaml", {"acme": acme})
        cfg.chmod(0o644)
        (d / "store").mkdir(mode=0o700)
        os.chown(d / "store", user.pw_uid, user.pw_gid)
        for command in ("issue", "run"):
            r = cli(command, "-c", str(cfg), prefix=as_nobody, timeout=60)
            assert r.returncode == 1, r.stderr
            error = r.stderr.splitlines()[-1]
            assert "port 80 on 0.0.0.0 (Permission denied, EACCES)" in error
            assert "These come from acme.port (80) and acme.bind_addresses (::, 0.0.0.0)" in error
            for way_out in (
                "Ports below 1024 need privileges",
                "a port such as 8009",
                "authbind (docs/deploy-authbind.md)",
                "`synapse-acme run --user USER`",
                "docs/deploy-systemd-socket.md",
            ):
                assert way_out in error, way_out
            assert "tcp6:" not in error and "interface=" not in error
            assert not (d / "store" / "account.json").exists()


# -- 4. messages that mislead -------------------------------------------------------------------


def test_issue_says_nothing_about_serving_and_promises_no_retry(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    names = ["serve.example.test"]
    cfg = pebble.write_acme_config(tmp_path, names)
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    assert line.startswith("OK      serve.example.test: certificate in ")
    assert "due for renewal at" in line and "then run `synapse-acme renew`" in line
    again = cli("issue", "-c", str(cfg))
    assert again.stdout == (
        "Nothing to do: every certificate is valid and not yet due for renewal.\n"
    )
    for out in (r, again):
        # No TLS listener in a one-shot command: nothing may claim to serve.
        assert "serving" not in out.stderr.lower(), out.stderr
        assert "retry" not in out.stdout + out.stderr and "next attempt" not in out.stderr
    status = cli("status", "-c", str(cfg))
    assert "served:" not in status.stdout  # only a process with a TLS listener serves


def test_an_untrusted_ca_names_ca_bundle_and_the_url(pebble: PebbleCA, tmp_path: Path) -> None:
    # No ca_bundle: Pebble's certificate is not in the system's trust store.
    cfg = pebble.write_acme_config(tmp_path, ["trust.example.test"], ca_bundle=None)
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 1
    [failed] = [line for line in r.stderr.splitlines() if line.startswith("FAILED")]
    assert f"cannot reach the ACME server at {pebble.directory_url}" in failed
    assert "certificate verify failed" in failed
    assert "set acme.ca_bundle to a PEM file with its root certificate" in failed
    assert "nothing will retry it" in failed and "next attempt" not in r.stderr
    # A ca_bundle that holds another CA.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(TestCA().root_pem)
    cfg = pebble.write_acme_config(tmp_path, ["trust.example.test"], ca_bundle=str(other))
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 1
    assert f"not signed by a certificate in acme.ca_bundle ({other})" in r.stderr


def test_a_ca_bundle_behind_an_unreadable_directory_reports_permission_denied(
    nobody: tuple[pwd.struct_passwd, list[str]],
) -> None:
    _, as_nobody = nobody
    with world_dir("first-hour-ca") as d:
        private = d / "private"
        private.mkdir(mode=0o700)  # root's: nobody may not enter
        (private / "ca.pem").write_bytes(TestCA().root_pem)
        (private / "ca.pem").chmod(0o644)  # the file itself would be readable
        acme = {"enabled": True, "domain": "ca.example.test", "ca_bundle": "private/ca.pem"}
        cfg = write_yaml(d / "acme.yaml", {"acme": acme})
        cfg.chmod(0o644)
        r = cli("status", "-c", str(cfg), prefix=as_nobody)
        assert r.returncode == 2
        assert r.stderr.startswith("configuration error: acme.ca_bundle: ")
        assert "Permission denied (EACCES)" in r.stderr
        assert f"the directory {private} is not searchable by nobody (uid " in r.stderr
        assert "that exists" not in r.stderr
        assert "got 'private/ca.pem'" in r.stderr


# -- 5. silent surprises ------------------------------------------------------------------------


def test_an_account_key_path_from_old_docs_creates_no_directories(tmp_path: Path) -> None:
    key = tmp_path / "path" / "to" / "acme_account.key"
    acme = {
        "enabled": True,
        "domain": "key.example.test",
        "storage": str(tmp_path / "store"),
        "account_key_file": str(key),
        "port": 0,
    }
    cfg = write_yaml(tmp_path / "acme.yaml", {"acme": acme})
    for command in ("issue", "renew", "run", "new-account"):
        r = cli(command, "-c", str(cfg), timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr == (
            f"configuration error: acme.account_key_file: its directory {key.parent} does not "
            "exist, and synapse-acme creates directories only inside the storage directory "
            f"({tmp_path / 'store'}): create that directory, or remove account_key_file to keep "
            f"the key in the storage directory (the default), got '{key}'\n"
        )
        assert tree(tmp_path) == ["acme.yaml"], command
    # Inside the storage directory a missing directory is made, 0700.
    acme["account_key_file"] = str(tmp_path / "store" / "keys" / "account.key")
    write_yaml(cfg, {"acme": acme})
    r = cli("new-account", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "store" / "keys").stat().st_mode) == 0o700


def test_both_blocks_in_one_homeserver_yaml_are_refused_like_the_module_does(
    tmp_path: Path,
) -> None:
    hs = write_yaml(
        tmp_path / "homeserver.yaml",
        {
            "server_name": "both.example.test",
            "acme": {"enabled": True, "port": 8009},
            "modules": [{"module": MODULE_NAME, "config": {"contact": "ops@example.test"}}],
        },
    )
    for command in ("issue", "status", "run"):
        r = cli(command, "-c", str(hs), timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(
            "configuration error: acme: both this top-level 'acme:' block and modules[0].config "
            "(the synapse-acme module's config) are set"
        )
        assert "move every key of the top-level 'acme:' block into the module config" in r.stderr
    assert tree(tmp_path) == ["homeserver.yaml"]


def test_one_name_written_as_a_string_is_one_name(pebble: PebbleCA, tmp_path: Path) -> None:
    cfg = pebble.write_acme_config(tmp_path, ["str.example.test"], domains="www.str.example.test")
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    names = ["str.example.test", "www.str.example.test"]
    chain = (tmp_path / "store" / "certificates" / names_key(names) / "fullchain.pem").read_bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    assert sorted(crypto.certificate_names(leaf)) == names
    # Several names in one string are refused with the list syntax to use.
    cfg = pebble.write_acme_config(tmp_path, ["str.example.test"], domains="a.example.test, b")
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 2
    assert r.stderr.startswith("configuration error: acme.domains: expected a DNS name")
    assert "several names are a YAML list, like [a.example.com, b.example.com]" in r.stderr


def test_verbosity_options_work_after_the_subcommand(pebble: PebbleCA, tmp_path: Path) -> None:
    cfg = pebble.write_acme_config(tmp_path, ["verbose.example.test"])
    r = cli("issue", "-c", str(cfg), "-v")
    assert r.returncode == 0, r.stderr
    assert " DEBUG synapse_acme." in r.stderr
    r = cli("renew", "-c", str(cfg), "-q")
    assert r.returncode == 0 and "Nothing to do" in r.stdout
    assert " INFO " not in r.stderr
    r = cli("-v", "renew", "--force", "-c", str(cfg), "-v")  # both places add up
    assert r.returncode == 0 and " DEBUG synapse_acme." in r.stderr, r.stderr
