#!/usr/bin/env bash
# The README's test command: on a fresh Debian machine, install everything the
# tests need (apt packages, a Python venv with aegis and its test extras, the
# compiled stage tool, the CPU build of vLLM, ...), then run pytest.
#
#   bash tests/run.sh [pytest args...]
#
# Set-up steps live in tests/setup.d/NN-name.sh and are sourced in order; each
# is idempotent and quick when its work is already done, so re-runs are cheap.
# AEGIS_CACHE (default ~/.cache/aegis) holds the venvs between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export AEGIS_REPO="$PWD"
export AEGIS_CACHE="${AEGIS_CACHE:-$HOME/.cache/aegis}"
export AEGIS_TEST_VENV="${AEGIS_TEST_VENV:-$AEGIS_CACHE/test-venv}"
mkdir -p "$AEGIS_CACHE"

log() { printf '[tests/run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

for step in tests/setup.d/*.sh; do
    [ -e "$step" ] || continue
    log "set-up: $step"
    # shellcheck disable=SC1090
    source "$step"
done

log "running pytest"
set +e
"$AEGIS_TEST_VENV/bin/python" -m pytest "$@"  # pytest.ini: testpaths = tests
rc=$?
set -e
# pytest exits 5 when no test ran: that is a failure for CI too.
exit "$rc"
