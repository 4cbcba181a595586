# Lint (ruff and mypy, tests/lint.sh) before pytest when AEGIS_LINT=1; .ci/run sets it, so a lint
# error fails CI. It is a set-up step rather than part of .ci/run because the tools live in the test
# venv, which exists only once 20-venv.sh has run. Off by default: a local `bash tests/run.sh` is not
# stopped by a long line; run `bash tests/lint.sh` yourself.
if [ "${AEGIS_LINT:-0}" = 1 ]; then
    log "lint: ruff and mypy (tests/lint.sh)"
    bash tests/lint.sh || { log "lint failed (bash tests/lint.sh shows why)"; return 1; }
fi
