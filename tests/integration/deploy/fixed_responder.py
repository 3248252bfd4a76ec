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

from synapse_acme.http01 import HTTP01ListenerService, HTTP01Responder, make_site


async def main(reactor: Any, endpoint: str, token: str, key_authorization: str) -> None:
    responder = HTTP01Responder()
    responder.start_responding("fixed.example.test", token, key_authorization)
    site = make_site(responder)
    original = site.log

    def log(request: Any) -> None:
        headers = {
            name.decode(): values[0].decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower().startswith((b"host", b"x-forwarded"))
        }
        record = {"method": request.method.decode(), "uri": request.uri.decode()}
        record.update({"code": request.code, "headers": headers})
        print(json.dumps(record), flush=True)
        original(request)

    site.log = log  # type: ignore[method-assign]
    listener = HTTP01ListenerService(reactor, site, [endpoint])
    listener.startService()
    ports = await listener.when_listening()
    print(f"listening {ports[0].getHost().port}", flush=True)
    await defer.Deferred()


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, *sys.argv[1:4])))
