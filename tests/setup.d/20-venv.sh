# A venv with aegis (editable) and its test extras. Re-used between runs.
if [ ! -x "$AEGIS_TEST_VENV/bin/python" ]; then
    log "creating $AEGIS_TEST_VENV"
    python3 -m venv "$AEGIS_TEST_VENV"
    "$AEGIS_TEST_VENV/bin/pip" install -q --upgrade pip
fi
"$AEGIS_TEST_VENV/bin/pip" install -q -e ".[test,plots,dev]"
