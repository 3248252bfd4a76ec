#!/usr/bin/env bash
# The version matrix: the unit tests at both ends of what setup.py declares.
#
#   bash scripts/test-versions.sh         (scripts/test.sh runs it after the main suite)
#
# The main suite (scripts/test.sh) runs in .venv: the default python3 and the newest releases.
# This adds, each job in its own venv:
#   min-py3.10       the oldest supported Python, every runtime dependency at its declared
#                    minimum (pip install -c constraints/minimum.txt), scripts/check_minimums.py
#                    (setup.py and the pins agree), unit tests except the Synapse module's;
#   min-py3.13       the same on the newest supported Python;
#   synapse-py3.13   the newest Python, matrix-synapse[all] (newest release of the supported range)
#                    installed first, then synapse-acme: `pip check` must find nothing broken;
#                    then every unit test, the Synapse module's included.
# A missing interpreter fails the run (scripts/lib.sh find_python says where it looked).
# The jobs run in parallel; each one's output goes to a log that is shown if it fails.
# A venv is rebuilt only when what it was built from changes (stamp), so a second run only tests;
# delete the .venv-* directories to pick up newer releases.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SAY_PREFIX=test-versions
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# Both ends of the Python range: python_requires in setup.py (checked by check_minimums.py) and
# the newest release the supported Synapse range runs on that CI has.
OLDEST=3.10
NEWEST=3.13
CONSTRAINTS=constraints/minimum.txt
TEST_TOOLS=(pytest hypothesis)

# The `synapse` extra of setup.py is the supported range: install its newest release, with [all].
SYNAPSE_SPEC="$(python3 -c '
import re
spec = re.search(r"\"matrix-synapse([^\"]*)\"", open("setup.py").read()).group(1)
print("matrix-synapse[all]" + spec)')"

PY_OLDEST="$(find_python "$OLDEST")"
PY_NEWEST="$(find_python "$NEWEST")"

LOGS="$(mktemp -d "${TMPDIR:-/tmp}/synapse-acme-versions.XXXXXX")"
WHEEL_DIR="$LOGS/wheel"

# One wheel for every job: building it in parallel in the same source tree would race.
say "building the synapse-acme wheel (log: $LOGS/wheel.log)"
rm -rf build  # setuptools' scratch copy: a module deleted from the tree would linger in it
python3 -m pip wheel --no-deps --disable-pip-version-check -w "$WHEEL_DIR" . >"$LOGS/wheel.log" 2>&1 || {
    tail -n 30 "$LOGS/wheel.log" >&2
    exit 1
}
WHEEL="$(ls "$WHEEL_DIR"/synapse_acme-*.whl)"
# An editable install (.venv) imports from the source tree and hides a module the wheel lacks
# (a directory without __init__.py, a data file not in package_data): compare the two.
python3 - "$WHEEL" <<'PY'
import pathlib, sys, zipfile
source = {
    p.as_posix()
    for p in pathlib.Path("synapse_acme").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
}
shipped = {n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("synapse_acme/")}
missing = sorted(source - shipped)
if missing:
    sys.exit("test-versions: the wheel lacks " + ", ".join(missing))
PY

stamp_of() {  # stamp_of PYTHON WHAT...: what a venv is built from
    {
        "$1" --version 2>&1
        shift
        printf '%s\n' "$@"
        cat setup.py "$CONSTRAINTS"
    } | sha256sum | cut -d' ' -f1
}

fresh_venv() {  # fresh_venv DIR PYTHON: an empty venv with a current pip
    rm -rf "$1"
    "$2" -m venv "$1"
    "$1/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
}

unit_tests() {  # unit_tests VENV [pytest args...]
    local venv=$1
    shift
    # Its own temporary directory and no cache: other pytest runs may share this tree meanwhile.
    "$venv/bin/python" -m pytest -q -p no:cacheprovider --basetemp "$LOGS/tmp-${venv#.}" \
        tests/unit "$@"
}

job_min() {  # job_min PYTHON X.Y
    local py=$1 venv=".venv-min-py$2" stamp t0=$SECONDS
    stamp="$(stamp_of "$py" min "${TEST_TOOLS[@]}")"
    if ! venv_fresh "$venv" "$stamp"; then
        echo "== building $venv: $("$py" --version) with $CONSTRAINTS"
        fresh_venv "$venv" "$py"
        "$venv/bin/python" -m pip install --progress-bar off -c "$CONSTRAINTS" "$WHEEL" \
            "${TEST_TOOLS[@]}"
        venv_stamp "$venv" "$stamp"
    fi
    "$venv/bin/python" scripts/check_minimums.py "$CONSTRAINTS" "$OLDEST"
    "$venv/bin/python" -m pip freeze
    # test_synapse_module.py needs matrix-synapse, which is not a runtime dependency: it runs in
    # .venv and in the synapse job.
    echo "== unit tests (venv ready after $((SECONDS - t0)) s)"
    unit_tests "$venv" --ignore=tests/unit/test_synapse_module.py
}

job_synapse() {  # job_synapse PYTHON X.Y
    local py=$1 venv=".venv-synapse-py$2" stamp t0=$SECONDS
    stamp="$(stamp_of "$py" "$SYNAPSE_SPEC" "${TEST_TOOLS[@]}")"
    if ! venv_fresh "$venv" "$stamp"; then
        echo "== building $venv: $("$py" --version), $SYNAPSE_SPEC, then synapse-acme"
        fresh_venv "$venv" "$py"
        "$venv/bin/python" -m pip install --progress-bar off "$SYNAPSE_SPEC"
        "$venv/bin/python" -m pip install --progress-bar off "$WHEEL"
        echo "== pip check right after installing synapse-acme next to $SYNAPSE_SPEC"
        "$venv/bin/python" -m pip check
        "$venv/bin/python" -m pip install --progress-bar off "${TEST_TOOLS[@]}"
        venv_stamp "$venv" "$stamp"
    fi
    echo "== pip check"
    "$venv/bin/python" -m pip check
    "$venv/bin/python" -m pip freeze | grep -iE '^(matrix-synapse|twisted|treq|acme|josepy|cryptography|pyopenssl)=='
    echo "== unit tests (venv ready after $((SECONDS - t0)) s)"
    unit_tests "$venv"
}

declare -A JOB_NAME JOB_START
start_job() {  # start_job NAME FUNCTION ARGS...
    local name=$1
    shift
    ("$@") >"$LOGS/$name.log" 2>&1 &
    JOB_NAME[$!]=$name
    JOB_START[$!]=$SECONDS
    say "started $name (log: $LOGS/$name.log)"
}

start_job "min-py$OLDEST" job_min "$PY_OLDEST" "$OLDEST"
start_job "min-py$NEWEST" job_min "$PY_NEWEST" "$NEWEST"
start_job "synapse-py$NEWEST" job_synapse "$PY_NEWEST" "$NEWEST"

failed=()
while [ "${#JOB_NAME[@]}" -gt 0 ]; do
    status=0
    wait -n -p done_pid "${!JOB_NAME[@]}" || status=$?
    name=${JOB_NAME[$done_pid]}
    took=$((SECONDS - JOB_START[$done_pid]))
    unset "JOB_NAME[$done_pid]"
    summary="$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$LOGS/$name.log" | tail -n 1 || true)"
    if [ "$status" -eq 0 ]; then
        say "ok     $name in ${took}s: ${summary:-?}"
    else
        say "FAILED $name (status $status) in ${took}s; the end of its log ($LOGS/$name.log):"
        tail -n 60 "$LOGS/$name.log" >&2
        failed+=("$name")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    say "failed: ${failed[*]}"
    exit 1
fi
rm -rf "$LOGS"
say "all version jobs passed"
