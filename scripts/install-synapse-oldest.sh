#!/usr/bin/env bash
# A second virtualenv with the OLDEST Synapse release synapse-acme supports (the newest one is in
# .venv), so the Synapse integration test runs at both ends of the declared range. `pip check`
# must find nothing broken in it: synapse-acme's dependencies fit that Synapse's.
# Idempotent: reinstalls only when the version or setup.py changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SAY_PREFIX=install-synapse-oldest
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
VERSION="${SYNAPSE_OLDEST:?set SYNAPSE_OLDEST}"
VENV=.venv-synapse-oldest
want="$VERSION $(sha256sum setup.py | cut -d' ' -f1)"
if ! venv_fresh "$VENV" "$want"; then
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    say "pip install -e . matrix-synapse==$VERSION into $VENV (log: $VENV/pip-install.log)"
    # prometheus-client 0.21 removed an API that Synapse 1.120 imports; newer Synapse does not need it.
    pip_run "$VENV/pip-install.log" "$VENV/bin/python" -m pip install -e . \
        "matrix-synapse==$VERSION" 'prometheus-client<0.21'
    venv_stamp "$VENV" "$want"
fi
say "pip check in $VENV"
"$VENV/bin/python" -m pip check
