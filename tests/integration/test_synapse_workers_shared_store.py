"""A real Synapse main process and one generic worker, each with a TLS listener, on one
PostgreSQL database (the homeserver's own; the module's tables beside Synapse's), with Redis for
replication, against a real Pebble.

Nothing on disk is shared between the two processes: each has its own directory, TLS files and
module ``storage`` (the worker's config overrides the module block). Only the main process has
the plain listener Pebble validates HTTP-01 at. The worker is asked to renew: it orders under
the issuance lock, the main process answers the CA from the database, and both serve the new
certificate on their TLS listeners within 2 s of the save, with one order at Pebble.

Needs ``redis-server`` (Debian ``redis-server``) and Synapse's ``redis`` extra (txredisapi) in
the interpreter that runs Synapse (``SYNAPSE_ACME_SYNAPSE_PYTHON``, as test_synapse.py).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from synapse_acme import crypto
from synapse_acme.names import names_key
from synapse_acme.pgstore import generate_key_file
from synapse_acme.testing import ports
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.postgres import PostgresServer, stored_certificate
from tests.integration.test_synapse import (
    HERE,
    SERVER_NAME,
    SYNAPSE_PYTHON,
    federation_version,
    fetch_chain,
    module_config,
    wait_for,
)

KEY = names_key([SERVER_NAME])
SERVE_WITHIN = 2.0


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


class Process:
    """One Synapse process (main or worker) with its own directory."""

    def __init__(self, workdir: pathlib.Path, argv: list[str]) -> None:
        self.dir = workdir
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        parts = []
        for name in ("app.log", "stdout.log"):
            try:
                parts.append((self.dir / name).read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)

    def start(self) -> None:
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _log_config(workdir: pathlib.Path) -> pathlib.Path:
    path = workdir / "log.yaml"
    path.write_text((HERE / "log.yaml").read_text().replace("{app_log}", str(workdir / "app.log")))
    return path


def _module(ca: PebbleCA, workdir: pathlib.Path, database: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(module_config(ca))
    config.update(database=database, storage=str(workdir / "acme"))
    return {"module": "synapse_acme.synapse.AcmeModule", "config": config}


def test_main_and_worker_on_one_database_without_a_shared_filesystem(
    tmp_path: pathlib.Path, postgres: PostgresServer
) -> None:
    redis = shutil.which("redis-server")
    assert redis is not None, "install redis-server (apt-get install -y redis-server)"
    dsn = postgres.create_database()
    words = dict(part.split("=", 1) for part in dsn.split())
    db_args = {
        "user": words["user"],
        "host": words["host"],
        "port": words["port"],
        "database": words["dbname"],
    }
    generate_key_file(str(tmp_path / "store.key"))
    store_key = tmp_path / "store.key"
    database = {"args": db_args, "key_files": [str(store_key)]}
    main_dir, worker_dir = tmp_path / "main", tmp_path / "worker"
    for d in (main_dir, worker_dir):
        (d / "tls").mkdir(parents=True, mode=0o700)
    reserved = {name: ports.reserve_port() for name in ("main_tls", "worker_tls", "repl", "redis")}
    port = {name: r.port for name, r in reserved.items()}
    processes: list[Process] = []
    redis_proc: subprocess.Popen[bytes] | None = None
    with PebbleCA(str(tmp_path / "pebble")) as ca:
        try:
            main_cfg = main_dir / "homeserver.yaml"
            main_doc: dict[str, Any] = {
                "server_name": SERVER_NAME,
                "pid_file": str(main_dir / "homeserver.pid"),
                "report_stats": False,
                "signing_key_path": str(main_dir / "signing.key"),
                "media_store_path": str(main_dir / "media"),
                "log_config": str(_log_config(main_dir)),
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "database": {"name": "psycopg2", "args": {**db_args, "cp_min": 1, "cp_max": 3}},
                "listeners": [
                    {
                        "port": port["main_tls"],
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "tls": True,
                        "resources": [{"names": ["federation"], "compress": False}],
                    },
                    {
                        "port": ca.http_port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "resources": [],
                    },
                    {
                        "port": port["repl"],
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "resources": [{"names": ["replication"]}],
                    },
                ],
                "instance_map": {"main": {"host": "127.0.0.1", "port": port["repl"]}},
                "redis": {"enabled": True, "host": "127.0.0.1", "port": port["redis"]},
                "tls_certificate_path": str(main_dir / "tls" / "fullchain.pem"),
                "tls_private_key_path": str(main_dir / "tls" / "privkey.pem"),
                "modules": [_module(ca, main_dir, database)],
            }
            main_cfg.write_text(yaml.safe_dump(main_doc))
            keys = subprocess.run(
                [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "-c", str(main_cfg),
                 "--generate-keys"],
                cwd=main_dir, capture_output=True, timeout=120, check=False,
            )  # fmt: skip
            assert (main_dir / "signing.key").exists(), keys.stdout + keys.stderr
            # The worker: its own listener, TLS files and module storage (its own directory).
            worker_cfg = worker_dir / "worker.yaml"
            worker_cfg.write_text(
                yaml.safe_dump(
                    {
                        "worker_app": "synapse.app.generic_worker",
                        "worker_name": "worker1",
                        "worker_log_config": str(_log_config(worker_dir)),
                        "worker_listeners": [
                            {
                                "port": port["worker_tls"],
                                "bind_addresses": ["127.0.0.1"],
                                "type": "http",
                                "tls": True,
                                "resources": [{"names": ["federation"], "compress": False}],
                            }
                        ],
                        "tls_certificate_path": str(worker_dir / "tls" / "fullchain.pem"),
                        "tls_private_key_path": str(worker_dir / "tls" / "privkey.pem"),
                        "modules": [_module(ca, worker_dir, database)],
                    }
                )
            )
            reserved["redis"].release()
            with open(tmp_path / "redis.log", "wb") as out:
                redis_proc = subprocess.Popen(
                    [redis, "--port", str(port["redis"]), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(tmp_path)],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            main = Process(main_dir, [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "-c",
                                      str(main_cfg)])  # fmt: skip
            worker = Process(
                worker_dir,
                [SYNAPSE_PYTHON, "-m", "synapse.app.generic_worker", "-c", str(main_cfg), "-c",
                 str(worker_cfg)],
            )  # fmt: skip
            processes += [main, worker]
            for name in ("main_tls", "repl"):
                reserved[name].release()
            main.start()
            wait_for(lambda: federation_version(port["main_tls"]), 60, "the main process", main.log)
            first = wait_for(
                lambda: stored_certificate(dsn, KEY), 60, "the first certificate", main.log
            )
            reserved["worker_tls"].release()
            worker.start()

            def worker_serves(serial: int) -> bool:
                assert worker.alive(), worker.log()[-6000:]
                return bool(fetch_chain(port["worker_tls"])[0].serial_number == serial)

            wait_for(lambda: worker_serves(first[0]), 60, "the worker serving it", worker.log)
            assert fetch_chain(port["main_tls"])[0].serial_number == first[0]
            assert ca.orders_created() == 1
            # The worker orders; the main process answers Pebble from the database.
            (worker_dir / "acme" / "renew-request").touch()

            def renewed() -> tuple[int, float] | None:
                now = stored_certificate(dsn, KEY)
                return now if now is not None and now[0] != first[0] else None

            new, saved_at = wait_for(renewed, 60, "the worker's renewal", worker.log)
            pending = {"main": port["main_tls"], "worker": port["worker_tls"]}
            while pending:
                for name, p in list(pending.items()):
                    if fetch_chain(p)[0].serial_number == new:
                        del pending[name]
                assert time.time() - saved_at < 10, (pending, main.log()[-3000:])
                time.sleep(0.02)
            lag = time.time() - saved_at
            assert lag <= SERVE_WITHIN, lag
            assert ca.orders_created() == 2
            assert "Certificate for a.example.test obtained" in worker.log()
            assert "saved by another process" in main.log()
            # No shared filesystem: each process exported to its own files.
            for d in (main_dir, worker_dir):
                leaf = crypto.parse_chain((d / "tls" / "fullchain.pem").read_bytes())[0]
                assert leaf.serial_number == new
        finally:
            for p in reversed(processes):
                p.stop()
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(timeout=20)
            for r in reserved.values():
                r.release()
