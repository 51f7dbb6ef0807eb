#!/usr/bin/env bash
# Install cxr-triage (editable) and start the whole pipeline on the embedded defaults:
# SQLite audit DB, embedded broker (no server), DICOM node + 1 worker, supervised.
# Extra arguments go to `cxr run` (e.g. ./run.sh --workers 2). Settings: CXR_* variables.
# RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_BREAK_SYSTEM_PACKAGES=1  # Debian's Python is "externally managed" (PEP 668)
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "run.sh: Python 3.11 or newer is required ($("$PY" --version 2>&1))" >&2; exit 1; }
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update && $SUDO apt-get install -y python3-pip
fi
"$PY" -m pip install --quiet -e .
exec "$PY" -m apps.cli run "$@"
