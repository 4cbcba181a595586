# shellcheck shell=bash
# Ray for the real Ray-cluster tests (tests/launch/test_ray_backend.py: clusters started through the
# agent on this machine, two of them side by side): a venv of its own, $AEGIS_CACHE/ray-venv, with
# ray[client] (never one of aegis's dependencies: on a cluster Ray comes with the site's vLLM). Made
# once (about 20 s and 300 MB on the development machine), then this takes well under a second. The
# tests find it through AEGIS_RAY_PYTHON. AEGIS_RAY_SETUP=0 skips it (those tests then skip).
_aegis_ray_req="ray[client]==2.60.0"
if [ "${AEGIS_RAY_SETUP:-1}" = 0 ]; then
    log "Ray venv: skipped (AEGIS_RAY_SETUP=0)"
else
    _aegis_ray_venv="$AEGIS_CACHE/ray-venv"
    if [ "$(cat "$_aegis_ray_venv/.aegis-ready" 2>/dev/null)" != "$_aegis_ray_req" ]; then
        log "Ray venv: installing $_aegis_ray_req into $_aegis_ray_venv (once)"
        # One installer at a time (flock); a half-made venv from an interrupted run is made again.
        (
            flock 9 || exit 1
            [ "$(cat "$_aegis_ray_venv/.aegis-ready" 2>/dev/null)" = "$_aegis_ray_req" ] && exit 0
            rm -rf "$_aegis_ray_venv" &&
                python3 -m venv "$_aegis_ray_venv" &&
                "$_aegis_ray_venv/bin/pip" install -q --disable-pip-version-check "$_aegis_ray_req" &&
                "$_aegis_ray_venv/bin/python" -c "import ray, grpc" &&
                echo "$_aegis_ray_req" > "$_aegis_ray_venv/.aegis-ready"
        ) 9>"$AEGIS_CACHE/ray-venv.lock" || { log "Ray venv set-up failed"; return 1; }
    fi
    export AEGIS_RAY_PYTHON="${AEGIS_RAY_PYTHON:-$_aegis_ray_venv/bin/python}"
    unset _aegis_ray_venv
fi
unset _aegis_ray_req
