"""A real Synapse with the module on a PostgreSQL store, sharing it with a `synapse-acme run`
process that has no filesystem in common with it (separate directories, no exported files).

Synapse's plain listener is the only HTTP-01 endpoint Pebble validates at; the runner has none.
When the runner renews, Synapse answers the CA from the database, and swaps the runner's
certificate into its TLS listener within 2 s of the save, from the database's change
notification (no file is watched). A real Synapse worker needs Redis for replication, which
these machines do not have, so the second process is the standalone runner.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from synapse_acme.names import names_key
from synapse_acme.pgstore import generate_key_file
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.postgres import PostgresServer, stored_certificate
from tests.integration.test_shared_store_pebble import Runner, served_serial
from tests.integration.test_synapse import (
    SERVER_NAME,
    Synapse,
    fetch_chain,
    module_config,
    wait_for,
)

KEY = names_key([SERVER_NAME])


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


def test_synapse_follows_the_database_and_answers_for_another_process(
    tmp_path: pathlib.Path, postgres: PostgresServer
) -> None:
    dsn = postgres.create_database()
    words = dict(part.split("=", 1) for part in dsn.split())
    database: dict[str, Any] = {
        "args": {
            "user": words["user"],
            "host": words["host"],
            "port": words["port"],
            "database": words["dbname"],
        },
        "key_files": [str(tmp_path / "store.key")],
    }
    generate_key_file(str(tmp_path / "store.key"))
    with PebbleCA(str(tmp_path / "pebble")) as ca:
        hs = Synapse(
            tmp_path / "hs",
            ca,
            module_config(ca) + "database: " + yaml.safe_dump(database, default_flow_style=True),
        )
        runner: Runner | None = None
        try:
            hs.start()
            first = wait_for(
                lambda: stored_certificate(dsn, KEY), 60, "the first certificate", hs.log
            )
            wait_for(
                lambda: fetch_chain(hs.tls_port)[0].serial_number == first[0],
                30,
                "Synapse serving it",
                hs.log,
            )
            config: dict[str, Any] = yaml.safe_load(
                pathlib.Path(ca.write_acme_config(tmp_path, [SERVER_NAME])).read_text()
            )["acme"]
            config.update(port=0, database=database, check_interval=600)
            runner = Runner("runner", tmp_path, config)
            wait_for(
                lambda: served_serial(runner.tls_port) == first[0] if runner else False,
                30,
                "the runner serving the stored certificate",
                runner.output,
            )
            runner.ask_renewal()  # the runner orders; Synapse answers the CA from the database

            def renewed() -> tuple[int, float] | None:
                now = stored_certificate(dsn, KEY)
                return now if now is not None and now[0] != first[0] else None

            new, saved_at = wait_for(renewed, 60, "the runner's renewal", runner.output)
            while fetch_chain(hs.tls_port)[0].serial_number != new:
                assert time.time() - saved_at < 10, hs.log()[-4000:]
                time.sleep(0.02)
            lag = time.time() - saved_at
            assert lag <= 2.0, lag
            assert runner.obtained() == 1  # the runner ordered it ...
            log = hs.log()
            assert "saved by another process" in log  # ... and Synapse adopted it
            assert "Certificate for a.example.test obtained" in log  # (the first was Synapse's)
        finally:
            if runner is not None:
                runner.stop()
            hs.stop()
