"""Alerts inside Matrix: where a homeserver's admins already look.

Two sinks (:class:`~synapse_acme.interfaces.IAlertSink`), chosen by :func:`choose_sinks`:

- :class:`RoomSink` when the module config sets ``alert_room`` and ``alert_sender``: an
  ``m.notice`` in that room, posted as that local user through the public module API
  (``create_and_send_event_into_room``). An explicit room wins over server notices: an
  operator who names a room wants the alerts there.
- :class:`ServerNoticesSink` when homeserver.yaml has ``server_notices``: a server notice to
  every active admin, in the room Synapse keeps for server notices (it invites the admin the
  first time). The admins are looked up at each alert, so a new admin gets the next one.

With neither, alerts go only to the log (and ``alert_webhook``), and the module says so once
at WARNING. The Synapse internals used live in :mod:`synapse_acme.synapse.glue`.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from twisted.internet import defer
from zope.interface import implementer

from synapse_acme.alerts import Alert
from synapse_acme.config import AcmeConfig
from synapse_acme.errors import SynapseAcmeError
from synapse_acme.interfaces import IAlertSink
from synapse_acme.synapse import glue as glue_module

logger = logging.getLogger(__name__)


class NoticeError(SynapseAcmeError):
    """An alert could not be posted inside Matrix (who, where, and why)."""


def notice_content(alert: Alert) -> dict[str, Any]:
    """The ``m.room.message`` content of an alert: a notice (bots do not answer notices)."""
    return {"msgtype": "m.notice", "body": alert.text()}


@implementer(IAlertSink)
@attrs.define(eq=False)
class ServerNoticesSink:
    """A server notice to each active admin of the homeserver."""

    glue: glue_module.SynapseGlue
    api: Any  # synapse.module_api.ModuleApi

    def describe(self) -> str:
        return "server notices to the homeserver's admins"

    def deliver(self, alert: Alert) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._deliver(alert))

    async def _deliver(self, alert: Alert) -> None:
        admins = await self.glue.admin_users(self.api)
        if not admins:
            raise NoticeError(
                "the homeserver has no active admin user to send a server notice to "
                "(make one admin, or set alert_room and alert_sender)"
            )
        failed: list[str] = []
        for user_id in admins:
            try:
                await self.glue.send_server_notice(user_id, notice_content(alert))
            except defer.CancelledError:
                raise
            except Exception as e:
                failed.append(f"{user_id}: {type(e).__name__}: {e}")
        if failed:
            raise NoticeError(
                f"server notice not sent to {len(failed)} of {len(admins)} admin(s): "
                + "; ".join(failed)
            )


@implementer(IAlertSink)
@attrs.define(eq=False)
class RoomSink:
    """An ``m.notice`` in ``room_id`` from the local user ``sender`` (who must have joined)."""

    api: Any  # synapse.module_api.ModuleApi
    room_id: str
    sender: str

    def describe(self) -> str:
        return f"the room {self.room_id} (as {self.sender})"

    def deliver(self, alert: Alert) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._deliver(alert))

    async def _deliver(self, alert: Alert) -> None:
        event = {
            "type": "m.room.message",
            "room_id": self.room_id,
            "sender": self.sender,
            "content": notice_content(alert),
        }
        try:
            await self.api.create_and_send_event_into_room(event)
        except defer.CancelledError:
            raise
        except Exception as e:
            raise NoticeError(
                f"{self.sender} could not post in {self.room_id} ({type(e).__name__}: {e}); "
                "has that user joined the room, and may it post there?"
            ) from None


def choose_sinks(config: AcmeConfig, glue: glue_module.SynapseGlue, api: Any) -> list[IAlertSink]:
    """The Matrix sinks for this homeserver (see the module docstring); [] with a WARNING when
    neither ``alert_room`` nor ``server_notices`` is configured."""
    if config.alert_room is not None and config.alert_sender is not None:
        return [RoomSink(api=api, room_id=config.alert_room, sender=config.alert_sender)]
    if glue.server_notices_enabled():
        return [ServerNoticesSink(glue=glue, api=api)]
    logger.warning(
        "synapse-acme: certificate alerts go only to the log%s: configure server_notices in "
        "homeserver.yaml (each admin then gets them as server notices), or set %s and %s",
        " and alert_webhook" if config.alert_webhook else "",
        config.key("alert_room"),
        config.key("alert_sender"),
    )
    return []


__all__ = ["NoticeError", "RoomSink", "ServerNoticesSink", "choose_sinks", "notice_content"]
