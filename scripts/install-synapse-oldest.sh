#!/usr/bin/env bash
# A second virtualenv with the OLDEST Synapse release synapse-acme supports (the newest one is in
# .venv), so the Synapse integration test runs at both ends of the declared range.
# Idempotent: reinstalls only when the version or setup.py changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VERSION="${SYNAPSE_OLDEST:?set SYNAPSE_OLDEST}"
VENV=.venv-synapse-oldest
stamp="$VENV/.installed"
want="$VERSION $(sha256sum setup.py | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
# prometheus-client 0.21 removed an API that Synapse 1.120 imports; newer Synapse does not need it.
"$VENV/bin/pip" install -q --disable-pip-version-check -e . "matrix-synapse==$VERSION" \
    'prometheus-client<0.21' >"$VENV/pip-install.log" 2>&1 || {
    tail -30 "$VENV/pip-install.log" >&2
    exit 1
}
echo "$want" >"$stamp"
