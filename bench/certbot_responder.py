"""Serve one HTTP-01 token with certbot's own standalone server until killed (for wrk).

    bench/.venv-certbot/bin/python bench/certbot_responder.py PORT TOKEN KEY_AUTHORIZATION \
        [--logs-dir DIR] [--address ADDR]

Runs in certbot's venv and builds what ``certbot --standalone`` builds, with certbot's own
code: its plugin's ``ServerManager.run`` (``acme.standalone.HTTP01DualNetworkedServers`` on
``(--http-01-address, port)``; certbot's default address is ``""``: an IPv6 socket on ``::``
that takes IPv4 too) serving an ``HTTP01Resource`` with the response and validation a real
challenge has. With ``--logs-dir`` the root logger is set up as certbot sets it up for every
run: DEBUG records to ``letsencrypt.log`` through certbot's own ``setup_log_file_handler``
(a 1 MiB rotating file), WARNING to stderr; certbot's request handler logs three DEBUG lines
per request there. Without it, nothing is logged (the bare server).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import types

import josepy as jose
from acme import challenges, standalone
from certbot._internal import log
from certbot._internal.plugins.standalone import ServerManager
from cryptography.hazmat.primitives.asymmetric import ec


def _certbot_logging(logs_dir: str) -> None:
    """The root logger of a certbot run (certbot's log.pre/post_arg_parse_setup, without the
    command line they read their settings from)."""
    config = types.SimpleNamespace(
        logs_dir=logs_dir, strict_permissions=False, max_log_backups=1000
    )
    handler, _ = log.setup_log_file_handler(config, "letsencrypt.log", log.FILE_FMT)  # type: ignore[arg-type]
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    root.addHandler(stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("token")
    parser.add_argument("validation")
    parser.add_argument("--logs-dir")
    parser.add_argument("--address", default="")  # certbot's --http-01-address default
    args = parser.parse_args()
    if args.logs_dir:
        _certbot_logging(args.logs_dir)
    chall = challenges.HTTP01(token=jose.b64decode(args.token))
    account_key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    resource = standalone.HTTP01RequestHandler.HTTP01Resource(
        chall=chall, response=chall.response(account_key), validation=args.validation
    )
    resources = {resource}
    servers = ServerManager(resources).run(args.port, challenges.HTTP01, listenaddr=args.address)
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    servers.shutdown_and_server_close()


if __name__ == "__main__":
    main()
