# shellcheck shell=bash source=/dev/null
# (tests/pbs/README.md; tests/fixtures/pbs.py starts the complex for tests/sched/test_pbs_real.py.)
# OpenPBS for the PBS test complex (tests/pbs/): its Debian packages
# (tests/pbs/apt-packages.txt) and a build of the vendored source
# (shared/vendor/openpbs-<commit>.tar.gz) into $AEGIS_CACHE/openpbs, once
# (3-6 min on 2 cores); when done this takes about 0.1 s. It only installs:
# tests start the complex with tests/pbs/start.sh. AEGIS_PBS_SETUP=0 skips it.
if [ "${AEGIS_PBS_SETUP:-1}" = 0 ]; then
    log "OpenPBS: skipped (AEGIS_PBS_SETUP=0)"
elif [ "$(id -u)" -ne 0 ]; then
    log "OpenPBS: skipped (needs root: apt, and the complex runs as root)"
elif ! (source tests/pbs/lib.sh && [ -n "$PBS_TARBALL" ]); then
    log "OpenPBS: skipped (no shared/vendor/openpbs-*.tar.gz next to or inside the checkout)"
else
    log "OpenPBS build (cached in $AEGIS_CACHE/openpbs)"
    bash tests/pbs/setup.sh || { log "OpenPBS setup failed (bash tests/pbs/setup.sh shows why)"; return 1; }
fi
