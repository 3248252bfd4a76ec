#!/usr/bin/env bash
# The project's test command (README): dependencies, lint, types, then the whole pytest suite.
#
#   bash scripts/test.sh [pytest args...]     e.g.  bash scripts/test.sh -m "not integration"
#
# Fails if any step fails, including pytest collecting no tests (exit 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
PY=.venv/bin/python
SYNAPSE_OLDEST=1.120.2
export SYNAPSE_OLDEST

step() { printf '\n==> %s\n' "$*" >&2; }

step "ruff check"
"$PY" -m ruff check synapse_acme tests
step "ruff format --check"
"$PY" -m ruff format --check synapse_acme tests
step "mypy"
"$PY" -m mypy
step "pytest $*"
status=0
"$PY" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

# The Synapse glue touches Synapse internals, so the declared range (setup.py's `synapse` extra)
# is tested at both ends: the run above used the newest release; this one the oldest.
if [ "$#" -eq 0 ]; then
    step "pytest tests/integration/test_synapse.py with Synapse $SYNAPSE_OLDEST"
    bash scripts/install-synapse-oldest.sh
    SYNAPSE_ACME_SYNAPSE_PYTHON="$PWD/.venv-synapse-oldest/bin/python" \
        SYNAPSE_ACME_EXPECT_SYNAPSE_VERSION="$SYNAPSE_OLDEST" \
        "$PY" -m pytest -q tests/integration/test_synapse.py
fi
