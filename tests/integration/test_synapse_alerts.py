"""Alerts inside Matrix: a real Synapse with the module and ``server_notices``, a real Pebble
that stops answering (SIGSTOP) and comes back. The admin reads the notices as any client
would: through the client-server API's ``/sync``."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import pathlib
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from synapse_acme import crypto
from synapse_acme.status import parse_status_file
from synapse_acme.testing.pebble import PebbleCA
from tests.integration.test_synapse import (
    ISSUE_TIMEOUT,
    SERVER_NAME,
    Synapse,
    fetch_chain,
    module_config,
    wait_for,
)

SHARED_SECRET = "synapse-acme-test-registration-secret"
NOTICES_USER = f"@notices:{SERVER_NAME}"
SERVER_NOTICES = """
server_notices:
  system_mxid_localpart: notices
  system_mxid_display_name: "Server Notices"
  room_name: "Server Notices"
registration_shared_secret: "{secret}"
"""


class Client:
    """A blocking Matrix client over the TLS listener (the test CA is not checked)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.token: str | None = None
        self.since: str | None = None
        self.seen: dict[str, str] = {}  # event ID -> body, in the order read

    def request(self, method: str, path: str, body: Any = None) -> Any:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=ctx)
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            assert resp.status == 200, (method, path, resp.status, text[:300])
            return json.loads(text)
        finally:
            conn.close()

    def register_admin(self, user: str, password: str) -> str:
        """Register an admin with the shared secret (Synapse's admin API) and log in."""
        path = "/_synapse/admin/v1/register"
        nonce = self.request("GET", path)["nonce"]
        mac = hmac.new(SHARED_SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), user.encode(), password.encode(), b"admin"]))
        body = {
            "nonce": nonce,
            "username": user,
            "password": password,
            "admin": True,
            "mac": mac.hexdigest(),
        }
        answer = self.request("POST", path, body)
        self.token = answer["access_token"]
        return str(answer["user_id"])

    def sync(self) -> dict[str, Any]:
        """The next incremental /sync (Synapse caches identical requests for minutes, so
        each one carries the last ``next_batch``), up to 100 timeline events per room."""
        flt = json.dumps({"room": {"timeline": {"limit": 100}}})
        path = "/_matrix/client/v3/sync?timeout=0&filter=" + _q(flt)
        if self.since is not None:
            path += "&since=" + _q(self.since)
        answer = dict(self.request("GET", path))
        self.since = answer["next_batch"]
        return answer

    def notices(self) -> list[str]:
        """The bodies of the server notices this user has read so far, in order, joining the
        server-notices room when invited to it (Synapse invites an admin with the first
        notice)."""
        rooms = self.sync().get("rooms", {})
        for room_id in rooms.get("invite", {}):
            self.request("POST", f"/_matrix/client/v3/join/{_q(room_id)}", {})
        for room in rooms.get("join", {}).values():
            for event in room.get("timeline", {}).get("events", []):
                content = event.get("content", {})
                if (
                    event.get("type") == "m.room.message"
                    and event.get("sender") == NOTICES_USER
                    and content.get("msgtype") == "m.notice"
                ):
                    self.seen.setdefault(event["event_id"], str(content.get("body")))
        return list(self.seen.values())


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@pytest.fixture
def pebble_ca(tmp_path: pathlib.Path) -> Iterator[PebbleCA]:
    with PebbleCA(str(tmp_path / "pebble"), env={"PEBBLE_WFE_NONCEREJECT": "0"}) as ca:
        yield ca


@pytest.fixture
def synapse(tmp_path: pathlib.Path, pebble_ca: PebbleCA) -> Iterator[Synapse]:
    hs = Synapse(tmp_path / "hs", pebble_ca, module_config(pebble_ca) + "request_timeout: 2\n")
    text = hs.config_path.read_text()
    # The admin reads its notices through the client API on the TLS listener.
    assert "- names: [federation]\n" in text
    text = text.replace("- names: [federation]\n", "- names: [federation, client]\n")
    hs.config_path.write_text(text + SERVER_NOTICES.format(secret=SHARED_SECRET))
    try:
        yield hs
    finally:
        hs.stop()


def failures(hs: Synapse) -> int:
    try:
        return parse_status_file((hs.storage / "status.json").read_bytes())[0].failures
    except (OSError, ValueError, IndexError):
        return -1


def fail_renewals(hs: Synapse, count: int) -> None:
    """``count`` forced renewals, each waited for until it has failed."""
    for _ in range(count):
        before = failures(hs)
        (hs.storage / "renew-request").write_text("")
        wait_for(lambda b=before: failures(hs) > b, ISSUE_TIMEOUT, "a failed renewal", hs.log)


def renew_ok(hs: Synapse) -> None:
    (hs.storage / "renew-request").write_text("")
    wait_for(lambda: failures(hs) == 0, ISSUE_TIMEOUT, "a successful renewal", hs.log)


def kinds(bodies: list[str]) -> list[str]:
    return [b.split(":")[1].strip() for b in bodies]


def test_admin_gets_one_notice_when_the_ca_fails_and_one_on_recovery(
    synapse: Synapse, pebble_ca: PebbleCA
) -> None:
    hs = synapse
    hs.start()

    def issued() -> bool:
        return not crypto.is_placeholder(fetch_chain(hs.tls_port)[0]) and failures(hs) == 0

    wait_for(issued, ISSUE_TIMEOUT, "the issued certificate", hs.log)
    admin = Client(hs.tls_port)
    assert admin.register_admin("admin", "correct horse battery staple") == f"@admin:{SERVER_NAME}"
    assert admin.notices() == []

    pebble_ca.pause()  # the CA stops answering: every renewal fails after request_timeout
    try:
        fail_renewals(hs, 3)
        bodies = wait_for(admin.notices, 30, "the FAILING notice", hs.log)
    finally:
        pebble_ca.resume()
    assert kinds(bodies) == ["FAILING"], bodies
    assert SERVER_NAME in bodies[0] and "no answer within 2 s" in bodies[0]
    assert "AcmeTransportError" in bodies[0]

    renew_ok(hs)
    bodies = wait_for(
        lambda: (b := admin.notices()) and "RECOVERED" in kinds(b) and b, 30, "RECOVERED", hs.log
    )
    assert kinds(bodies) == ["FAILING", "RECOVERED"], bodies

    # A second failure on the same day: no second FAILING (and so no second RECOVERED).
    pebble_ca.pause()
    try:
        fail_renewals(hs, 2)
        time.sleep(2)  # the alerter decides within 0.5 s of the status; delivery is quick
    finally:
        pebble_ca.resume()
    renew_ok(hs)
    time.sleep(2)
    assert kinds(admin.notices()) == ["FAILING", "RECOVERED"]
    log = hs.log()
    assert "Certificate alerts (failing, expiring, recovered) go to server notices" in log
    assert "Could not deliver" not in log
