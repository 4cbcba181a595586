# The CPU build of vLLM (a venv in $AEGIS_CACHE/vllm-venv, ~3.5 GB, installed
# once in a few minutes) and the tiny offline model the vLLM tests serve.
# Both are cached: when present this takes well under a second.
log "vLLM CPU venv and tiny model (cached in $AEGIS_CACHE)"
"$AEGIS_TEST_VENV/bin/python" -m aegis.testing.cpu_vllm setup --cache "$AEGIS_CACHE" >/dev/null
