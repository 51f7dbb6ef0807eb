#!/usr/bin/env bash
# Install everything and run the full test suite (this is what .ci/run calls).
#   - Python packages: pip install -e '.[test]'
#   - Debian packages when missing: dcmtk orthanc orthanc-dicomweb dicom3tools chromium
#     redis-server postgresql
#   - starts Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, user postgres, db test)
#     when they are down; no system Orthanc service is left holding 4242/8042
#   - static checks: ruff check, ruff format --check, lint-imports, mypy (strict)
#   - then: python3 -m pytest -q -ra (extra arguments are passed to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_BREAK_SYSTEM_PACKAGES=1 DEBIAN_FRONTEND=noninteractive
PY="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

# SKIP_INSTALL=1: only start the services and run pytest (used by the suite's own test)
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
# ---------------------------------------------------------------- Debian packages
missing=()
[ -x /usr/bin/dcmsend ] || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
# the web console's browser tests drive Debian's Chromium with Playwright (PyPI has no
# browser for `playwright install` to download here)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
"$PY" -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  # keep the packages from starting services during installation (Orthanc would take
  # 4242/8042); only if no policy is in place already
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
  if [ "$own_policy" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi
# a system Orthanc service must not hold the default ports (tests use free ports anyway)
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
  $SUDO systemctl stop orthanc || true
  $SUDO systemctl disable orthanc || true
elif [ -x /etc/init.d/orthanc ] && $SUDO /etc/init.d/orthanc status >/dev/null 2>&1; then
  $SUDO /etc/init.d/orthanc stop || true
fi

# ---------------------------------------------------------------- Python packages
"$PY" -m pip install --quiet -e '.[test]'
fi

# ---------------------------------------------------------------- Redis
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "test.sh: starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi

# ---------------------------------------------------------------- PostgreSQL
pg_ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "test.sh: starting PostgreSQL $pg_ver"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$pg_ver" main start
  for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
fi
pg() { psql "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5" -Atq "$@"; }
if ! pg -c 'select 1' >/dev/null 2>&1; then
  # tests connect as postgres without a password on loopback only
  hba="/etc/postgresql/$pg_ver/main/pg_hba.conf"
  echo "test.sh: allowing trust auth for postgres on 127.0.0.1/::1 in $hba"
  $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$pg_ver" main reload
  sleep 1
fi
if [ "$(pg -c "select 1 from pg_database where datname = 'test'")" != 1 ]; then
  pg -c 'create database test'
fi

# ---------------------------------------------------------------- static checks
# (issue 10) lint, format, import layers (pyproject.toml [tool.importlinter]) and strict
# types (pyproject.toml [tool.mypy]); any failure fails the run before the tests start
if [ "${SKIP_INSTALL:-0}" != 1 ] && [ "${SKIP_STATIC:-0}" != 1 ]; then
  bin="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
  echo "test.sh: ruff check, ruff format --check, lint-imports, mypy"
  "$PY" -m ruff check .
  "$PY" -m ruff format --check .
  "$bin/lint-imports" --no-cache
  "$PY" -m mypy
fi

# ---------------------------------------------------------------- tests
exec "$PY" -m pytest -q -ra "$@"
