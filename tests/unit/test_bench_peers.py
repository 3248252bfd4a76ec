"""The benchmark's nginx peer: Debian's shipped configuration with only the documented lines
changed (bench/responder.py), so the comparison is against nginx as it runs in production."""

from __future__ import annotations

import pytest

from bench.responder import debian_nginx_conf

# The directives of Debian 12's /etc/nginx/nginx.conf (nginx-common 1.22) the bench relies on.
SHIPPED = """user www-data;
worker_processes auto;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
include /etc/nginx/modules-enabled/*.conf;

events {
\tworker_connections 768;
}

http {
\tsendfile on;
\ttcp_nopush on;
\tinclude /etc/nginx/mime.types;
\tdefault_type application/octet-stream;
\taccess_log /var/log/nginx/access.log;
\tgzip on;
\tinclude /etc/nginx/conf.d/*.conf;
\tinclude /etc/nginx/sites-enabled/*;
}
"""


def test_only_paths_listener_and_foreground_change() -> None:
    conf = debian_nginx_conf(SHIPPED, "/P", 1234, "/R")
    kept = [
        "worker_processes auto;",
        "include /etc/nginx/modules-enabled/*.conf;",
        "\tworker_connections 768;",
        "\tsendfile on;",
        "\ttcp_nopush on;",
        "\tdefault_type application/octet-stream;",
        "\tgzip on;",
    ]
    lines = conf.splitlines()
    assert all(line in lines for line in kept)
    assert "pid /P/nginx.pid;" in lines and "daemon off;" in lines
    assert "error_log /P/logs/error.log;" in lines
    assert "\taccess_log /P/logs/access.log;" in lines  # still written, same format
    assert "\t\tlisten 127.0.0.1:1234 default_server;" in lines and "\t\troot /R;" in lines
    assert "/var/log" not in conf and "sites-enabled" not in conf and "/run/" not in conf
    assert "worker_processes 1" not in conf and "access_log off" not in conf


def test_another_file_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(RuntimeError, match=r"not Debian's shipped file \(no access_log\)"):
        debian_nginx_conf(
            SHIPPED.replace("\taccess_log /var/log/nginx/access.log;\n", ""), "/P", 1, "/R"
        )
