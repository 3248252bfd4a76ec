# shellcheck shell=bash
# Shell helpers shared by scripts/install-deps.sh and scripts/test-versions.sh (sourced, not run).
#
#   apt_ensure PKG...            install the Debian packages that are missing (root or sudo)
#   pip_run LOG PIP ARGS...      run pip, keep its whole output in LOG, show its progress lines
#   venv_fresh DIR STAMP         true if DIR is a venv whose stamp file holds STAMP
#   find_python X.Y              path of a Python X.Y interpreter, or a clear error

say() { printf '%s: %s\n' "${SAY_PREFIX:-scripts}" "$*" >&2; }

# Debian packages that are not installed yet, from the arguments.
apt_missing() {
    local pkg
    for pkg in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            printf '%s\n' "$pkg"
        fi
    done
}

apt_ensure() {
    if [ "${SYNAPSE_ACME_SKIP_APT:-0}" = 1 ]; then
        say "SYNAPSE_ACME_SKIP_APT=1: not checking Debian packages ($*)"
        return
    fi
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "not a Debian-like system: install these by hand: $*"
        return
    fi
    local missing
    mapfile -t missing < <(apt_missing "$@")
    if [ "${#missing[@]}" -eq 0 ]; then
        say "Debian packages present: $*"
        return
    fi
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            say "need root (or sudo) to install: ${missing[*]}"
            exit 1
        fi
    fi
    say "installing Debian packages: ${missing[*]} (apt-get update first)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# pip_run LOG PIP ARGS...: `PIP install ARGS` style call whose full output goes to LOG while the
# lines that show progress (what is being fetched, built, installed) are echoed, so a long
# install is never silent. On failure the end of the log is shown and the status returned.
pip_run() {
    local log=$1 pip=$2
    shift 2
    local errexit=0 status
    case $- in *e*) errexit=1 ;; esac
    set +e
    "$pip" "$@" --progress-bar off --disable-pip-version-check 2>&1 | tee -a "$log" \
        | grep --line-buffered -E '^(Collecting|Building wheel for|Installing collected|Successfully installed|ERROR)' \
        | sed -u 's/^/    pip: /' >&2
    status=${PIPESTATUS[0]}
    [ "$errexit" = 1 ] && set -e
    if [ "$status" -ne 0 ]; then
        say "pip failed (status $status); the end of $log:"
        tail -n 30 "$log" >&2
    fi
    return "$status"
}

venv_fresh() {  # venv_fresh DIR STAMP
    [ -x "$1/bin/python" ] && [ -f "$1/.synapse-acme-stamp" ] && [ "$(cat "$1/.synapse-acme-stamp")" = "$2" ]
}

venv_stamp() {  # venv_stamp DIR STAMP: record what DIR now holds
    printf '%s\n' "$2" >"$1/.synapse-acme-stamp"
}

# find_python X.Y: the newest installed CPython X.Y. Looked up in this order: the environment
# variable SYNAPSE_ACME_PYTHON_X_Y (e.g. SYNAPSE_ACME_PYTHON_3_10=/usr/bin/python3.10), pyenv's
# versions directory, then pythonX.Y on PATH. Missing is an error, never a skip: the version
# matrix would otherwise pass without testing the end it claims to test.
find_python() {
    local want=$1 var candidate
    var="SYNAPSE_ACME_PYTHON_${want//./_}"
    local candidates=()
    if [ -n "${!var:-}" ]; then
        if [ "$("${!var}" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
            printf '%s\n' "${!var}"
            return 0
        fi
        say "$var=${!var} is not a Python $want interpreter"
        return 1
    fi
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    if [ -d "$root/versions" ]; then
        while IFS= read -r candidate; do
            candidates+=("$candidate")
        done < <(find "$root/versions" -maxdepth 3 -path "*/versions/$want.*/bin/python$want" 2>/dev/null \
            | sort -V -r)
    fi
    candidate="$(command -v "python$want" 2>/dev/null || true)"
    [ -n "$candidate" ] && candidates+=("$candidate")
    for candidate in "${candidates[@]}"; do
        if [ -x "$candidate" ] && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    say "no Python $want found (looked at \$$var, $root/versions/$want.*, python$want on PATH)."
    say "Install it (e.g. \`pyenv install $want\`) or set $var=/path/to/python$want."
    return 1
}
