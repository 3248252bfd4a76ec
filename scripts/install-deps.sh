#!/usr/bin/env bash
# Install what synapse-acme's tests and demo need; idempotent and fast when already done.
#
#   bash scripts/install-deps.sh
#
# 1. Debian packages (APT_PACKAGES below): only when one is missing, via apt-get (as root, or sudo).
# 2. A virtualenv at .venv with `pip install -e '.[EXTRAS]'`, redone only when setup.py,
#    pyproject.toml or the extras change (a stamp file in .venv records what was installed).
#
# Environment: PYTHON (interpreter for the venv, default python3), SYNAPSE_ACME_EXTRAS (pip extras,
# default below), SYNAPSE_ACME_SKIP_APT=1 (trust that the programs are there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- Debian packages the test suite and the demo run. Add new ones HERE (one place). --------------
#   pebble      : real ACME test CA (+ pebble-challtestsrv DNS stub)      -> synapse_acme.testing.pebble
#   sslscan     : inspects the TLS listeners from outside                  -> tls integration tests
#   wrk         : HTTP load generator                                      -> bench smoke test
#   strace      : proves the crash harness traced every directory change   -> tests/faults crash tests
#   python3-venv: `python3 -m venv` on Debian
#   openssl, ca-certificates, curl: demo output and sanity checks
APT_PACKAGES=(pebble sslscan python3-venv openssl ca-certificates curl wrk nginx apache2 authbind systemd util-linux strace)
# ------------------------------------------------------------------------------------------------

# pip extras installed into .venv. The Synapse integration adds "synapse" here.
EXTRAS="${SYNAPSE_ACME_EXTRAS:-dev,synapse}"
PYTHON="${PYTHON:-python3}"
VENV=.venv

say() { printf 'install-deps: %s\n' "$*" >&2; }

missing_apt_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            printf '%s\n' "$pkg"
        fi
    done
}

install_apt() {
    if [ "${SYNAPSE_ACME_SKIP_APT:-0}" = 1 ]; then
        say "SYNAPSE_ACME_SKIP_APT=1: not checking Debian packages"
        return
    fi
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "not a Debian-like system: install by hand: ${APT_PACKAGES[*]}"
        return
    fi
    local missing
    missing="$(missing_apt_packages)"
    if [ -z "$missing" ]; then
        return
    fi
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    say "installing Debian packages: $(echo $missing)"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            say "need root (or sudo) to install: $(echo $missing)"
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    # shellcheck disable=SC2086
    "${sudo[@]}" apt-get install -y -q --no-install-recommends $missing
}

install_venv() {
    local stamp="$VENV/.synapse-acme-installed"
    local want
    want="$(
        {
            echo "extras=$EXTRAS"
            cat setup.py pyproject.toml
        } | sha256sum | cut -d' ' -f1
    )"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$VENV/bin/python" -c 'import synapse_acme' 2>/dev/null; then
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    say "pip install -e '.[$EXTRAS]' into $VENV (log: $VENV/pip-install.log)"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip \
        && "$VENV/bin/python" -m pip install -e ".[$EXTRAS]"; } >"$VENV/pip-install.log" 2>&1; then
        tail -n 40 "$VENV/pip-install.log" >&2
        say "pip install failed (full log: $VENV/pip-install.log)"
        exit 1
    fi
    echo "$want" >"$stamp"
}

install_apt
install_venv
for prog in pebble pebble-challtestsrv sslscan; do
    if ! command -v "$prog" >/dev/null 2>&1; then
        say "WARNING: $prog is still not on PATH; integration tests will fail"
    fi
done
