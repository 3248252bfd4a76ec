#!/usr/bin/env bash
# Install what the demo or the test suite needs; idempotent, and quick when already done.
#
#   bash scripts/install-deps.sh           # the test stack (scripts/test.sh, scripts/bench.sh)
#   bash scripts/install-deps.sh --demo    # only what scripts/demo.sh runs
#
# The demo profile is what an operator's machine gets from the README's first command:
#   Debian: pebble, openssl, ca-certificates (+ python3-venv when the interpreter lacks ensurepip)
#   .venv-demo: `pip install .`, i.e. synapse-acme and its runtime dependencies, nothing else.
# The test profile adds the programs the integration tests drive and the developer tools:
#   Debian: the demo's packages + TEST_APT below
#   .venv: `pip install -e '.[dev,synapse,postgres]'` (ruff, mypy, pytest, matrix-synapse, psycopg2).
# Each venv is redone only when what it was built from changes (a stamp file inside records it).
# pip's progress (each package as it is fetched, built and installed) is shown; its whole output
# is kept in <venv>/pip-install.log.
#
# Environment: PYTHON (interpreter for the venvs, default python3), SYNAPSE_ACME_EXTRAS (pip
# extras of the test venv, default dev,synapse,postgres), SYNAPSE_ACME_SKIP_APT=1 (trust that the
# programs are there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SAY_PREFIX=install-deps
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

PROFILE="test"
case "${1:-}" in
    --demo) PROFILE=demo ;;
    "") ;;
    *)
        echo "usage: bash scripts/install-deps.sh [--demo]" >&2
        exit 2
        ;;
esac

# ---- Debian packages. Add new ones HERE (one place). ---------------------------------------------
#   pebble      : the real ACME test CA (+ pebble-challtestsrv DNS stub) -> synapse_acme.testing.pebble
#   openssl     : the demo's `openssl verify` of the issued chain
#   ca-certificates: the system trust store Python's ssl module and pip expect
DEMO_APT=(pebble openssl ca-certificates)
#   sslscan     : inspects the TLS listeners from outside                  -> tls integration tests
#   curl        : sanity checks in the deployment tests
#   wrk         : HTTP load generator                                      -> bench smoke test
#   nginx, apache2, authbind, systemd (systemd-socket-activate), util-linux -> deployment tests
#   strace      : proves the crash harness traced every directory change   -> tests/faults
#   testssl.sh  : rates the TLS listener from outside                      -> test_testssl.py
#   prometheus  : a real Prometheus scrapes the runner and Synapse; promtool checks the
#                 exposition and unit-tests contrib/prometheus/'s alert rules -> test_*metrics*.py
#                 (its systemd service plays no part: the tests start their own)
#   bind9       : a real DNS primary (named, tsig-keygen) for RFC 2136 DNS-01 -> test_dns01_bind.py
#   build-essential, libpq-dev: compile what has no wheel for every Python in the version matrix
#                 (psycopg2 of matrix-synapse[all] and of the postgres extra, old PyYAML)
#                                                                          -> scripts/test-versions.sh
#   postgresql  : a real PostgreSQL (initdb, pg_ctl under /usr/lib/postgresql/*/bin) for the
#                 PostgreSQL store -> synapse_acme.testing.postgres, test_store_contract_postgres.py
#                 (its systemd service plays no part: the tests start their own)
#   redis-server: Synapse workers replicate through Redis -> test_synapse_workers_shared_store.py
#                 (its systemd service plays no part: the test starts its own)
TEST_APT=(sslscan curl wrk nginx apache2 authbind systemd util-linux strace testssl.sh
    prometheus build-essential libpq-dev bind9 postgresql redis-server)
# ------------------------------------------------------------------------------------------------

PYTHON="${PYTHON:-python3}"

apt_packages() {
    local pkgs=("${DEMO_APT[@]}")
    [ "$PROFILE" = test ] && pkgs+=("${TEST_APT[@]}")
    # Debian's python3 has no `venv` without python3-venv (ensurepip is split out).
    if ! command -v "$PYTHON" >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        pkgs+=(python3-venv)
    fi
    printf '%s\n' "${pkgs[@]}"
}

# install_venv DIR STAMP PIP-ARGS...: (re)build DIR with `pip install PIP-ARGS` unless its stamp
# says it already holds exactly that.
install_venv() {
    local venv=$1 stamp=$2
    shift 2
    # The import runs from / so that it cannot find the source tree instead of the install.
    local python="$PWD/$venv/bin/python"
    if venv_fresh "$venv" "$stamp" && (cd / && "$python" -c 'import synapse_acme') 2>/dev/null; then
        say "$venv is up to date"
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$venv"
    fi
    local log="$venv/pip-install.log"
    : >"$log"
    say "pip install $* into $venv (full log: $log)"
    local start=$SECONDS
    pip_run "$log" "$venv/bin/python" -m pip install --upgrade pip
    pip_run "$log" "$venv/bin/python" -m pip install "$@"
    say "$venv ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"
    venv_stamp "$venv" "$stamp"
}

mapfile -t APT < <(apt_packages)
apt_ensure "${APT[@]}"

if [ "$PROFILE" = demo ]; then
    # A regular (not editable) install, as an operator gets from `pip install synapse-acme`: it
    # proves the built package carries its data files and entry point. The stamp covers the
    # sources too, so an edit is picked up at the next run.
    stamp="$(
        {
            echo "demo $("$PYTHON" --version 2>&1)"
            cat setup.py pyproject.toml
            find synapse_acme -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
        } | sha256sum | cut -d' ' -f1
    )"
    rm -rf build  # setuptools' scratch copy: a module deleted from the tree would linger in it
    install_venv .venv-demo "$stamp" .
else
    EXTRAS="${SYNAPSE_ACME_EXTRAS:-dev,synapse,postgres}"
    stamp="$(
        {
            echo "extras=$EXTRAS $("$PYTHON" --version 2>&1)"
            cat setup.py pyproject.toml
        } | sha256sum | cut -d' ' -f1
    )"
    install_venv .venv "$stamp" -e ".[$EXTRAS]"
fi

for prog in pebble pebble-challtestsrv openssl $([ "$PROFILE" = test ] && echo sslscan prometheus promtool); do
    if ! command -v "$prog" >/dev/null 2>&1; then
        say "WARNING: $prog is still not on PATH"
    fi
done
