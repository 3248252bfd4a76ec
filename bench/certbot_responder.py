"""Serve one HTTP-01 token with certbot's own standalone server until killed (for wrk).

    bench/.venv-certbot/bin/python bench/certbot_responder.py PORT TOKEN KEY_AUTHORIZATION

Runs in certbot's venv and builds exactly what ``certbot --standalone`` builds
(``acme.standalone.HTTP01DualNetworkedServers`` with one ``HTTP01Resource``).
"""

from __future__ import annotations

import signal
import sys
import threading

import josepy as jose
from acme import challenges, standalone


def main() -> None:
    port, token, validation = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    chall = challenges.HTTP01(token=jose.b64decode(token))
    resource = standalone.HTTP01RequestHandler.HTTP01Resource(
        chall=chall, response=None, validation=validation
    )
    servers = standalone.HTTP01DualNetworkedServers(("127.0.0.1", port), {resource})
    servers.serve_forever()
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    servers.shutdown_and_server_close()


if __name__ == "__main__":
    main()
