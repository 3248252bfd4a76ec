"""Alerts from the real standalone runner: `synapse-acme run` against a real Pebble that stops
answering (SIGSTOP) and comes back, posting to a real local webhook receiver (port 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from synapse_acme.interprocess import request_renewal
from synapse_acme.status import parse_status_file
from synapse_acme.testing.pebble import PebbleCA

NAME = "alerts.example.test"
TIMEOUT = 60.0


class Receiver:
    """A webhook endpoint on 127.0.0.1, port 0; keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        return [b["event"] for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def wait_for(check: Callable[[], Any], what: str, log: Callable[[], str]) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log()[-5000:]}")


def test_run_posts_failing_once_then_recovered_to_the_webhook(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path, receiver: Receiver
) -> None:
    ca = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "0"})
    url = f"http://127.0.0.1:{receiver.port}/hook/SECRET-TOKEN"
    cfg = ca.write_acme_config(tmp_path, [NAME], alert_webhook=url, request_timeout=2)
    storage = tmp_path / "store"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "synapse_acme", "run", "-c", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )

    def log() -> str:
        return log_path.read_text(errors="replace")

    def status() -> Any:
        try:
            return parse_status_file((storage / "status.json").read_bytes())[0]
        except (OSError, ValueError, IndexError):
            return None

    def failures() -> int:
        s = status()
        return s.failures if s is not None else 0

    try:
        wait_for(lambda: status() and status().has_certificate, "the first certificate", log)
        assert receiver.bodies == []  # success: nothing to say
        ca.pause()  # the CA stops answering
        try:
            for n in range(1, 5):  # four failed renewals in a row
                request_renewal(str(storage))
                wait_for(lambda n=n: failures() >= n, f"failed attempt {n}", log)
            wait_for(lambda: receiver.bodies, "the failing alert", log)
        finally:
            ca.resume()
        request_renewal(str(storage))
        wait_for(lambda: "recovered" in receiver.events(), "the recovered alert", log)
        time.sleep(1)  # anything else would arrive now
        assert receiver.events() == ["failing", "recovered"], receiver.bodies
        failing, recovered = receiver.bodies
        assert failing["name"] == NAME and failing["names"] == [NAME]
        assert failing["error_type"] == "AcmeTransportError"
        assert "no answer within 2 s" in failing["error"]
        assert failing["not_after"] and failing["at"] and failing["host"]
        assert recovered["error"] is None and recovered["not_after"] > failing["not_after"]
        assert receiver.paths == ["/hook/SECRET-TOKEN"] * 2
        state = json.loads((storage / "alerts.json").read_text())
        assert next(iter(state["certificates"].values()))["reported"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log()
    assert "SECRET" not in text, "the webhook's token reached the log"
    assert "Alert (failing)" in text and "Alert (recovered)" in text
    assert "Traceback" not in text
