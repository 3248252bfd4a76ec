#!/usr/bin/env bash
# Benchmarks against certbot, acme-tiny, lego and nginx, and the module's cost to Synapse:
# writes docs/BENCHMARKS.md and docs/img/*.png.
#
#   bash scripts/bench.sh                      # full run (~40 min on 2 cores: 5 runs of every peer)
#   bash scripts/bench.sh --profile smoke      # tiny sizes, a minute; any args go to bench/run.py
#
# Installs what it measures against, and nothing of it goes into the project's .venv:
#   - project deps + .venv via scripts/install-deps.sh (Pebble, ...)
#   - Debian: lego, acme-tiny (the original Matrix TLS guide's client), wrk (load generator),
#     nginx-light (webroot and static-file server)
#   - bench/.venv-certbot: certbot from PyPI, in its own venv as certbot's docs recommend for pip
#   - bench/.venv: matplotlib (plots), py-spy and pyinstrument (profiling)
# Run it on a quiet machine: other load skews every figure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*" >&2; }

bash scripts/install-deps.sh

BENCH_APT=(lego acme-tiny wrk nginx-light)
missing=()
for pkg in "${BENCH_APT[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    sudo=()
    [ "$(id -u)" != 0 ] && sudo=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

venv() {  # venv DIR PACKAGES...
    local dir=$1
    shift
    local stamp="$dir/.bench-installed" want="$*"
    if [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    say "pip install $* into $dir"
    [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip >"$dir/pip.log" 2>&1
    "$dir/bin/python" -m pip install -q "$@" >>"$dir/pip.log" 2>&1 || {
        tail -n 30 "$dir/pip.log" >&2
        exit 1
    }
    echo "$want" >"$stamp"
}
venv bench/.venv-certbot certbot
venv bench/.venv matplotlib py-spy pyinstrument

say "python -m bench.run $*"
.venv/bin/python -m bench.run "$@"
say "plots -> docs/img/"
bench/.venv/bin/python bench/plots.py bench/results.json docs/img
say "done: docs/BENCHMARKS.md"
