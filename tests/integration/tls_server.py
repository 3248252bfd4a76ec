"""A real-reactor HotSwapTLS listener for the integration tests (run as a subprocess).

    python tls_server.py --pair KEY CERTFILE KEYFILE [--pair ...] [--watch-interval S]
    python tls_server.py --rotate N --rotate-interval S --workdir DIR

Prints ``PORT <n>`` once listening on 127.0.0.1. ``--pair`` serves files through a FileWatcher
(with SIGHUP installed as "reload now"). ``--rotate`` mints N+1 certificates for
``rot.example.test`` (root CA written to DIR/root.pem), serves the first, and after the first
line on stdin swaps to the next one every S seconds, printing
``SWAP <i> <serial> <monotonic before> <monotonic after>`` per swap and ``DONE`` at the end.
It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from twisted.internet import reactor, stdio
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall

from synapse_acme.limits import ConnectionLimits
from synapse_acme.listeners import tls_listener
from synapse_acme.tls import HotSwapTLS
from synapse_acme.watch import FileWatcher, install_sighup


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Control(Protocol):
    """First line on stdin starts the rotation; EOF stops the process."""

    def __init__(self, on_start: object) -> None:
        self.on_start = on_start
        self.started = False

    def dataReceived(self, data: bytes) -> None:
        if not self.started and b"\n" in data:
            self.started = True
            if callable(self.on_start):
                self.on_start()

    def connectionLost(self, reason: object = None) -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", nargs=3, action="append", default=[])
    parser.add_argument("--watch-interval", type=float, default=0.2)
    parser.add_argument("--default", default=None)
    parser.add_argument("--rotate", type=int, default=0)
    parser.add_argument("--rotate-interval", type=float, default=0.02)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    tls = HotSwapTLS(clock=reactor, default_key=args.default)
    on_start = None
    for key, cert_path, key_path in args.pair:
        watcher = FileWatcher(cert_path, key_path, key, tls, reactor, args.watch_interval)
        watcher.startService()
        install_sighup(reactor, watcher.reload)  # chains: every watcher reloads

    if args.rotate:
        from tests.certs import TestCA

        ca = TestCA()
        with open(os.path.join(args.workdir, "root.pem"), "wb") as f:
            f.write(ca.root_pem)
        bundles = [ca.issue(["rot.example.test"]) for _ in range(args.rotate + 1)]
        tls.set_bundle("rot", bundles[0])
        state = {"i": 0}

        def swap() -> None:
            state["i"] += 1
            i = state["i"]
            before = time.monotonic()
            tls.set_bundle("rot", bundles[i])
            after = time.monotonic()
            serial = tls.serial("rot")
            say(f"SWAP {i} {serial} {before} {after}")
            if i == args.rotate:
                loop.stop()
                say("DONE")

        loop = LoopingCall(swap)
        say(f"INITIAL {tls.serial('rot')}")

        def on_start() -> None:  # type: ignore[misc]
            loop.start(args.rotate_interval, now=False)

    # With the caps and handshake deadline of `synapse-acme run`'s listeners.
    service = tls_listener(
        reactor,  # type: ignore[arg-type]
        "tcp:0:interface=127.0.0.1",
        tls,
        limits=ConnectionLimits(),
    )
    service.privilegedStartService()
    service.startService()
    port = service.ports[0].getHost().port  # a TCP bind is done when startService returns
    stdio.StandardIO(Control(on_start))
    say(f"PORT {port}")
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
