"""alerter, webhook and the Synapse notice sinks: on a Clock, with the real service, a stub
HTTP server (treq.testing) and fakes of the two Synapse calls the sinks make."""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from synapse_acme import crypto
from synapse_acme.alerter import Alerter
from synapse_acme.alerts import EXPIRING, FAILING, RECOVERED, Alert
from synapse_acme.config import parse_acme_config
from synapse_acme.errors import AcmeTransportError, ConfigError
from synapse_acme.interfaces import IAlertSink
from synapse_acme.model import CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.status import time_from_seconds
from synapse_acme.synapse.notices import RoomSink, ServerNoticesSink, choose_sinks
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from synapse_acme.webhook import WebhookError, WebhookSink, public_part
from tests.certs import TestCA
from tests.deferreds import failure_of, outcome_of, result_of

START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ("example.test",)
KEY = names_key(NAMES)
DAY = 86400.0
DOWN = AcmeTransportError("connection refused", "https://ca.test/dir")


@implementer(IAlertSink)
class Inbox:
    """A sink that keeps what it gets (or fails as told)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.fail: Exception | None = None

    def describe(self) -> str:
        return "the test inbox"

    def deliver(self, alert: Alert) -> defer.Deferred[None]:
        if self.fail is not None:
            return defer.fail(self.fail)
        self.alerts.append(alert)
        return defer.succeed(None)


class World:
    """The real AcmeService on a Clock, its statuses going to an Alerter with an Inbox."""

    def __init__(self, storage: Path, lifetime_days: float = 90) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.ca = TestCA(now=START)
        self.issuer = FakeIssuer(
            ca=self.ca, clock=self.clock, lifetime=datetime.timedelta(days=lifetime_days)
        )
        self.inbox = Inbox()
        self.storage = storage
        self.alerter = self.make_alerter()
        self.service = AcmeService(
            [CertificateSpec(names=NAMES)],
            MemoryStore(),
            self.issuer,
            self.clock,
            check_jitter=0.0,
            threshold_days=None,
            on_status=lambda s: self.alerter.statuses_changed(s),
        )

    def make_alerter(self) -> Alerter:
        return Alerter(
            self.clock, [self.inbox], state_path=str(self.storage / "alerts.json"), recheck=3600
        )

    def start(self) -> None:
        self.alerter.startService()
        self.service.startService()
        self.clock.advance(1)

    def restart(self) -> None:
        """A new process: a new Alerter reading the state file (the service keeps going)."""
        self.alerter.stopService()
        self.alerter = self.make_alerter()
        self.alerter.startService()

    def force(self) -> None:
        self.service.renew(force=True).addErrback(lambda _: None)
        self.clock.advance(1)

    def events(self) -> list[str]:
        return [a.event for a in self.inbox.alerts]


def test_the_service_failing_for_a_day_is_one_notice_then_one_recovery(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    assert w.events() == []  # issued: nothing to say
    w.issuer.fail_next(*[DOWN] * 10_000)
    for _ in range(200):  # forced renewals as fast as they come: a flood of failures
        w.force()
    for _ in range(int(DAY // 600) - 1):  # and the retry schedule for (almost) a day
        w.clock.advance(600)
    assert w.service.status()[0].failures >= 200
    assert w.events() == [FAILING]
    alert = w.inbox.alerts[0]
    assert alert.error_type == "AcmeTransportError" and "connection refused" in (alert.error or "")
    w.issuer.failures.clear()
    w.force()
    assert w.events() == [FAILING, RECOVERED]
    assert [a.event for a in w.alerter.sent] == [FAILING, RECOVERED]


def test_a_crash_loop_cannot_flood(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    w.issuer.fail_next(*[DOWN] * 10_000)
    for _ in range(50):  # each "restart" sees the failure again
        w.force()
        w.restart()
        w.force()
    assert w.events() == [FAILING]
    state = json.loads((tmp_path / "alerts.json").read_text())
    assert state["certificates"][KEY]["reported"] is True
    assert oct(os.stat(tmp_path / "alerts.json").st_mode & 0o777) == oct(0o600)


def test_expiring_repeats_daily_by_the_hourly_look_without_any_new_status(tmp_path: Path) -> None:
    w = World(tmp_path, lifetime_days=12)
    w.start()
    w.issuer.fail_next(*[DOWN] * 10_000)
    w.force()
    assert w.events() == [EXPIRING]
    w.service.stopService()  # nothing publishes a status any more; the alerter keeps looking
    for _ in range(3 * 24):
        w.clock.advance(3600)
    assert w.events() == [EXPIRING] * 4


def test_a_failing_sink_is_logged_and_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(tmp_path)
    broken = Inbox()
    broken.fail = RuntimeError("homeserver said no")
    w.alerter.add_sink(broken)
    w.start()
    w.issuer.fail_next(*[DOWN] * 10)
    with caplog.at_level(logging.WARNING):
        w.force()
    assert w.events() == [FAILING]
    assert "Could not deliver the failing alert for example.test to the test inbox" in caplog.text
    assert "homeserver said no" in caplog.text
    assert "Alert (failing): synapse-acme: FAILING" in caplog.text


def test_unreadable_state_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "alerts.json").write_text("{broken")
    with caplog.at_level(logging.WARNING):
        w = World(tmp_path)
    assert "Cannot read the alert state" in caplog.text
    w.start()
    w.issuer.fail_next(DOWN)
    w.force()
    assert w.events() == [FAILING]


def test_the_alerter_provides_no_sink_and_the_sinks_provide_the_contract() -> None:
    clock = Clock()
    assert verifyObject(IAlertSink, Inbox())
    assert verifyObject(IAlertSink, WebhookSink("https://h/x", StubTreq(Resource()), clock, "h"))  # type: ignore[arg-type]
    assert verifyObject(IAlertSink, RoomSink(api=None, room_id="!r:h", sender="@a:h"))
    assert verifyObject(IAlertSink, ServerNoticesSink(glue=None, api=None))  # type: ignore[arg-type]


# -- the webhook ------------------------------------------------------------------------------


class Receiver(Resource):
    """A webhook endpoint: answers with the codes it is given, in turn; ``hang`` never answers."""

    isLeaf = True

    def __init__(self, codes: list[int | str]) -> None:
        super().__init__()
        self.codes = codes
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[str | None] = []

    def render_POST(self, request: Any) -> bytes | int:
        self.bodies.append(json.loads(request.content.read()))
        self.headers.append(request.getHeader("content-type"))
        code = self.codes.pop(0) if self.codes else 200
        if code == "hang":
            return server.NOT_DONE_YET
        assert isinstance(code, int)
        request.setResponseCode(code)
        return b"x" * 10_000 if code >= 400 else b"ok"


def alert(clock: Clock) -> Alert:
    return Alert(
        event=FAILING,
        key=KEY,
        names=NAMES,
        at=crypto.now_from_clock(clock),
        error="connection refused",
        error_type="AcmeTransportError",
        not_after=time_from_seconds(clock.seconds() + 10 * DAY),
        failures=1,
    )


def webhook(codes: list[int | str]) -> tuple[WebhookSink, Receiver, StubTreq, Clock]:
    clock = Clock()
    clock.advance(START.timestamp())
    receiver = Receiver(codes)
    stub = StubTreq(receiver)
    url = "https://hooks.example/services/T000/SECRET-TOKEN"
    return WebhookSink(url, stub, clock, "matrix1", timeout=10), receiver, stub, clock  # type: ignore[arg-type]


def test_webhook_posts_the_documented_json() -> None:
    sink, receiver, stub, clock = webhook([200])
    d = sink.deliver(alert(clock))
    stub.flush()
    assert result_of(d) is None
    body = receiver.bodies[0]
    assert receiver.headers == ["application/json"]
    assert body["event"] == "failing" and body["name"] == "example.test"
    assert body["names"] == ["example.test"] and body["host"] == "matrix1"
    assert body["error"] == "connection refused" and body["error_type"] == "AcmeTransportError"
    assert body["not_after"] == "2026-11-11T12:00:00Z" and body["at"] == "2026-11-01T12:00:00Z"


def test_webhook_retries_server_errors_then_gives_up_without_showing_the_token() -> None:
    sink, receiver, stub, clock = webhook([503, 502, 500, 200])
    d = sink.deliver(alert(clock))
    for _ in range(3):
        stub.flush()
        clock.advance(5)
    stub.flush()
    e = failure_of(d, WebhookError)
    assert len(receiver.bodies) == 3  # three attempts, then it stops
    assert "HTTP 500" in str(e) and "gave up" in str(e)
    assert "SECRET" not in str(e) and "https://hooks.example/..." in str(e)
    assert len(str(e)) < 500  # the answer's body is cut


def test_webhook_retry_succeeds_and_client_errors_are_not_retried() -> None:
    sink, receiver, stub, clock = webhook([429, 200])
    d = sink.deliver(alert(clock))
    stub.flush()
    clock.advance(1)
    stub.flush()
    assert result_of(d) is None and len(receiver.bodies) == 2
    sink, receiver, stub, clock = webhook([404])
    d = sink.deliver(alert(clock))
    stub.flush()
    assert "HTTP 404" in str(failure_of(d, WebhookError)) and len(receiver.bodies) == 1


def test_webhook_that_never_answers_times_out_on_the_clock() -> None:
    sink, receiver, stub, clock = webhook(["hang", "hang", "hang"])
    d = sink.deliver(alert(clock))
    for _ in range(3):
        stub.flush()
        clock.advance(10)  # the timeout
        clock.advance(5)  # the wait before the next attempt
    e = failure_of(d, WebhookError)
    assert "no answer within 10 s" in str(e) and len(receiver.bodies) == 3


def test_webhook_delivery_can_be_cancelled() -> None:
    sink, _, stub, clock = webhook(["hang"])
    d = sink.deliver(alert(clock))
    stub.flush()
    d.cancel()
    stub.flush()
    clock.advance(60)
    stub.flush()
    failure_of(d, defer.CancelledError)
    assert clock.getDelayedCalls() == []  # no retry, no deadline left


def test_public_part_hides_path_query_and_credentials() -> None:
    assert public_part("https://user:pw@h.example:8443/a/b?token=x") == "https://h.example:8443/..."
    assert public_part("http://[::1]/x") == "http://[::1]/..."


# -- config -----------------------------------------------------------------------------------


def test_alert_settings_parse_and_errors_name_the_key_without_the_url() -> None:
    config = parse_acme_config(
        {
            "alert_webhook": "https://hooks.example/SECRET",
            "alert_room": "!room:example.org",
            "alert_sender": "@acme:example.org",
            "alerts": {"expiry_days": 7},
        },
        server_name="example.org",
    )
    assert config.alerts.enabled and config.alerts.expiry_days == 7
    assert parse_acme_config({"alerts": False}).alerts.enabled is False
    with pytest.raises(ConfigError) as info:
        parse_acme_config({"alert_webhook": "ftp://x/SECRET"})
    assert info.value.path == "acme.alert_webhook" and "SECRET" not in str(info.value)
    with pytest.raises(ConfigError, match=r"acme\.alert_room.*needs alert_sender"):
        parse_acme_config({"alert_room": "!room:example.org"})
    with pytest.raises(ConfigError, match=r"acme\.alert_sender.*needs alert_room"):
        parse_acme_config({"alert_sender": "@a:example.org"})
    with pytest.raises(ConfigError, match=r"acme\.alert_room: expected a Matrix room ID"):
        parse_acme_config({"alert_room": "#alias:example.org", "alert_sender": "@a:b"})
    with pytest.raises(ConfigError, match=r"acme\.alert_sender: expected a Matrix user ID"):
        parse_acme_config({"alert_room": "!r:b", "alert_sender": "acme"})
    with pytest.raises(ConfigError, match=r"acme\.alerts\.expiry_days"):
        parse_acme_config({"alerts": {"expiry_days": 0}})


# -- the Synapse sinks -------------------------------------------------------------------------


class FakeGlue:
    """The three glue calls the notice sinks make."""

    def __init__(self, admins: list[str], notices: bool = True) -> None:
        self.admins = admins
        self.notices = notices
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.refuse: set[str] = set()

    def server_notices_enabled(self) -> bool:
        return self.notices

    def admin_users(self, api: Any) -> defer.Deferred[list[str]]:
        return defer.succeed(list(self.admins))

    def send_server_notice(self, user_id: str, content: Any) -> defer.Deferred[None]:
        if user_id in self.refuse:
            return defer.fail(RuntimeError("Workers cannot send server notices"))
        self.sent.append((user_id, dict(content)))
        return defer.succeed(None)


class FakeApi:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.refuse = False

    async def create_and_send_event_into_room(self, event: dict[str, Any]) -> None:
        if self.refuse:
            raise RuntimeError("403: User @acme:h not in room !r:h")
        self.events.append(event)


def test_server_notices_go_to_every_admin_as_notices() -> None:
    glue = FakeGlue(["@a:h", "@b:h"])
    sink = ServerNoticesSink(glue=glue, api=None)  # type: ignore[arg-type]
    result_of(sink.deliver(alert(Clock())))
    assert [u for u, _ in glue.sent] == ["@a:h", "@b:h"]
    content = glue.sent[0][1]
    assert content["msgtype"] == "m.notice" and content["body"].startswith("synapse-acme: FAILING")
    glue.refuse = {"@b:h"}
    e = failure_of(sink.deliver(alert(Clock())), Exception)
    assert "1 of 2 admin(s)" in str(e) and "@b:h" in str(e)
    e = failure_of(ServerNoticesSink(FakeGlue([]), None).deliver(alert(Clock())), Exception)  # type: ignore[arg-type]
    assert "no active admin" in str(e)


def test_room_sink_posts_a_notice_as_the_sender_or_says_why_not() -> None:
    api = FakeApi()
    sink = RoomSink(api=api, room_id="!r:h", sender="@acme:h")
    result_of(sink.deliver(alert(Clock())))
    event = api.events[0]
    assert event["room_id"] == "!r:h" and event["sender"] == "@acme:h"
    assert event["type"] == "m.room.message" and event["content"]["msgtype"] == "m.notice"
    api.refuse = True
    e = failure_of(sink.deliver(alert(Clock())), Exception)
    assert "@acme:h could not post in !r:h" in str(e) and "joined the room" in str(e)


def test_choose_sinks_room_then_server_notices_then_only_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    room = parse_acme_config({"alert_room": "!r:h", "alert_sender": "@a:h"}, path="config")
    plain = parse_acme_config({}, path="config")
    assert isinstance(choose_sinks(room, FakeGlue([]), FakeApi())[0], RoomSink)  # type: ignore[arg-type]
    assert isinstance(choose_sinks(plain, FakeGlue([]), FakeApi())[0], ServerNoticesSink)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        assert choose_sinks(plain, FakeGlue([], notices=False), FakeApi()) == []  # type: ignore[arg-type]
    assert "alerts go only to the log" in caplog.text
    assert "config.alert_room" in caplog.text and "server_notices" in caplog.text


def test_runtime_wires_the_alerter_only_into_running_services(tmp_path: Path) -> None:
    from synapse_acme.runtime import make_alerter

    config = parse_acme_config(
        {"storage": str(tmp_path), "alert_webhook": "https://hooks.example/x"}, server_name="h.t"
    )
    alerter = make_alerter(config, Clock(), None)  # type: ignore[arg-type]
    assert alerter is not None
    assert [s.describe() for s in alerter.sinks] == ["the webhook https://hooks.example/..."]
    off = parse_acme_config({"storage": str(tmp_path), "alerts": False}, server_name="h.t")
    assert make_alerter(off, Clock(), None) is None  # type: ignore[arg-type]
    assert outcome_of(defer.succeed(None)) is None
