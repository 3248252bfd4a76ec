#!/usr/bin/env bash
# The project's test command (README): dependencies, lint, types, the whole pytest suite, then
# the version range setup.py declares, tested at both ends.
#
#   bash scripts/test.sh [pytest args...]     e.g.  bash scripts/test.sh -m "not integration"
#
# With pytest args only that pytest run happens. Without, it is followed by
#   - the Synapse integration test against the oldest supported Synapse, in a venv where
#     `pip check` must be clean (scripts/install-synapse-oldest.sh),
#   - the version matrix (scripts/test-versions.sh): the unit tests on the oldest and the newest
#     supported Python with every runtime dependency at its declared minimum, and next to
#     matrix-synapse[all] with `pip check`.
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

    step "version matrix (scripts/test-versions.sh)"
    bash scripts/test-versions.sh
fi
