#!/usr/bin/env bash
# Static checks with the test venv's tools: ruff ([tool.ruff] in pyproject.toml) and mypy ([tool.mypy]).
# Both always run, so one pass shows every problem; exits 1 if either failed.
#
#   bash tests/lint.sh
#
# The venv (with ruff and mypy from the `dev` extra) is made by tests/setup.d/20-venv.sh; CI runs this
# script through tests/setup.d/90-lint.sh (AEGIS_LINT=1, set by .ci/run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
venv="${AEGIS_TEST_VENV:-${AEGIS_CACHE:-$HOME/.cache/aegis}/test-venv}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
    echo "tests/lint.sh: $py not found: bash tests/run.sh creates it (or set AEGIS_TEST_VENV)" >&2
    exit 2
fi
rc=0
echo "tests/lint.sh: ruff check" >&2
"$py" -m ruff check aegis tests benchmarks conftest.py || rc=1
echo "tests/lint.sh: mypy" >&2
"$py" -m mypy || rc=1
exit "$rc"
