"""The real HTTP-01 listener serving one fixed token, to probe what a proxy forwards.

    python fixed_responder.py ENDPOINT TOKEN KEYAUTH

Prints "listening <port>" once bound and runs until killed. Also records each request's path,
Host and X-Forwarded-* headers on stdout as JSON lines, so tests can see what the proxy sent.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, task

from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import ChallengeHTTPProtocol, make_factory
from synapse_acme.listeners import ListenerService


class _Recording(ChallengeHTTPProtocol):
    """The real protocol, printing each request head it answers as a JSON line."""

    def _answer(self, head: bytes) -> None:
        lines = head.decode("latin-1").splitlines()
        method, uri = [*lines[0].split(" "), "", ""][:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower().startswith(("host", "x-forwarded")):
                headers[name] = value.strip()
        print(json.dumps({"method": method, "uri": uri, "headers": headers}), flush=True)
        super()._answer(head)


async def main(reactor: Any, endpoint: str, token: str, key_authorization: str) -> None:
    responder = HTTP01Responder()
    responder.start_responding("fixed.example.test", token, key_authorization)
    factory = make_factory(responder, reactor)
    factory.protocol = _Recording
    listener = ListenerService(reactor, factory, [endpoint])
    listener.startService()
    ports = await listener.when_listening()
    print(f"listening {ports[0].getHost().port}", flush=True)
    await defer.Deferred()


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, *sys.argv[1:4])))
