"""Serve one HTTP-01 token with synapse-acme until killed (for wrk).

    python bench/serve_responder.py PORT TOKEN KEY_AUTHORIZATION [--site]

By default this is the listener ``synapse-acme run`` opens (``http01_server.make_factory``
inside the default connection caps, ``limits.LimitedFactory``, as
``runtime.http01_listener_for`` builds it), on 127.0.0.1, with the default reactor (epoll).
``--site`` serves the same responder through its ``twisted.web`` resource in a plain ``Site``
instead (how Synapse serves it on its own listeners), to show what the small protocol gains.
Prints ``ready`` once listening.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import make_factory
from synapse_acme.limits import ConnectionLimits, LimitedFactory


def main() -> None:
    port, token, validation = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    responder = HTTP01Responder()
    responder.start_responding("bench.example.test", token, validation)
    if "--site" in sys.argv[4:]:
        root, well_known = Resource(), Resource()
        root.putChild(b".well-known", well_known)
        well_known.putChild(b"acme-challenge", responder.resource())
        factory: object = Site(root)
    else:
        limits = ConnectionLimits()
        factory = LimitedFactory(
            make_factory(responder, reactor, limits.header_timeout),  # type: ignore[arg-type]
            limits,
            reactor,  # type: ignore[arg-type]
            "HTTP-01 listener",
        )
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined,arg-type]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
