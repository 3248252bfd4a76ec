#!/bin/sh
# authbind recipe: let one unprivileged user bind one port below 1024 (default 80), so
# synapse-acme answers the CA on port 80 without root. Run once, as root:
#
#   sh authbind-setup.sh synapse-acme          # user [port]
#
# then start the runner as that user through authbind (--deep: Python binds from a child
# library call, not from the program authbind started):
#
#   authbind --deep synapse-acme run -c /etc/synapse-acme/acme-port80.yaml
#
# In a systemd unit: ExecStart=/usr/bin/authbind --deep /usr/local/bin/synapse-acme run -c ...
# Guide: docs/deploy-authbind.md
set -eu
user="${1:?usage: authbind-setup.sh USER [PORT]}"
port="${2:-80}"
byport=/etc/authbind/byport
command -v authbind >/dev/null || { echo "authbind is not installed: apt-get install authbind" >&2; exit 1; }
id "$user" >/dev/null || { echo "no such user: $user" >&2; exit 1; }
mkdir -p "$byport"
touch "$byport/$port"
chown "$user" "$byport/$port"
# authbind lets a user bind the port if the user may *execute* this file.
chmod 500 "$byport/$port"
echo "$user may now bind port $port through: authbind --deep <command>"
