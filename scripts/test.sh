#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian machine: installs what the tests
# need (Dovecot, the PostgreSQL server, the Python packages), then runs pytest.
# The tests start their own private Dovecot and PostgreSQL on free loopback
# ports (tests/dovecot.py, tests/pgcluster.py) and stop them at the end; the
# PostgreSQL line of pytest's header names the port.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v dovecot >/dev/null 2>&1 || need_apt+=(dovecot-imapd)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

exec .venv/bin/python -m pytest "$@"
