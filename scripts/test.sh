#!/usr/bin/env bash
# The project's test command (README): dependencies, lint, types, the whole pytest suite, then
# the version range setup.py declares, tested at both ends.
#
#   bash scripts/test.sh [pytest args...]     e.g.  bash scripts/test.sh -m "not integration"
#
# With pytest args only that pytest run happens. Without, it is followed by
#   - the Synapse integration test against the oldest supported Synapse, in a venv where
#     `pip check` must be clean (scripts/install-synapse-oldest.sh),
#   - the version matrix (scripts/test-versions.sh, run beside the suite): the unit tests on the
#     oldest and the newest supported Python with every runtime dependency at its declared
#     minimum, and next to matrix-synapse[all] with `pip check`.
# Fails if any step fails, including pytest collecting no tests (exit 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
PY=.venv/bin/python
SYNAPSE_OLDEST=1.120.2
export SYNAPSE_OLDEST

step() { printf '\n==> %s\n' "$*" >&2; }

# The version matrix needs only its own venvs and the source tree, and the suite below leaves a
# core idle most of the time (it waits on Pebble, nginx, Synapse...). So it runs beside the
# suite, at the lowest CPU and I/O priority so that it takes only what the suite leaves; its
# report is shown after the suite. It has its own process group, stopped if this script stops.
MATRIX_PID=
stop_matrix() {
    if [ -n "$MATRIX_PID" ] && kill -0 "$MATRIX_PID" 2>/dev/null; then
        kill -TERM -- "-$MATRIX_PID" 2>/dev/null || true
    fi
}
if [ "$#" -eq 0 ]; then
    MATRIX_LOG="$(mktemp "${TMPDIR:-/tmp}/synapse-acme-matrix.XXXXXX")"
    low=(nice -n 19)
    if command -v ionice >/dev/null 2>&1 && ionice -c 3 true 2>/dev/null; then
        low+=(ionice -c 3)
    fi
    step "version matrix (scripts/test-versions.sh) started beside the suite; log: $MATRIX_LOG"
    setsid "${low[@]}" bash scripts/test-versions.sh >"$MATRIX_LOG" 2>&1 &
    MATRIX_PID=$!
    trap stop_matrix EXIT
fi

step "ruff check"
"$PY" -m ruff check synapse_acme tests
step "ruff format --check"
"$PY" -m ruff format --check synapse_acme tests
step "mypy"
"$PY" -m mypy
step "pytest $*"
status=0
# Two worker processes, each running whole test files (--dist loadfile: a file's module-scoped
# Pebble, PostgreSQL or Synapse stays in one process). Most integration tests wait on other
# programs, so two at a time roughly halve the suite on 2 cores; every test binds port 0, takes a
# locked port reservation (synapse_acme/testing/ports.py) or its own temporary directory, so
# files never share a port or a file.
"$PY" -m pytest -q -n 2 --dist loadfile "$@" || status=$?
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

    step "version matrix (scripts/test-versions.sh), started beside the suite"
    status=0
    wait "$MATRIX_PID" || status=$?
    MATRIX_PID=
    cat "$MATRIX_LOG" >&2
    [ "$status" -eq 0 ] || exit "$status"
    rm -f "$MATRIX_LOG"
fi
