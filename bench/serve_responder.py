"""Serve one HTTP-01 token with synapse-acme's real challenge site until killed (for wrk).

    python bench/serve_responder.py PORT TOKEN KEY_AUTHORIZATION

This is the listener ``synapse-acme run`` opens (``http01.make_site``), on 127.0.0.1, with the
default reactor (epoll); prints ``ready`` once listening.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from synapse_acme.http01 import HTTP01Responder, make_site


def main() -> None:
    port, token, validation = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    responder = HTTP01Responder()
    responder.start_responding("bench.example.test", token, validation)
    reactor.listenTCP(port, make_site(responder), interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
