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
exit "$status"
