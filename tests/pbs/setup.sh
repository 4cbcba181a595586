#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Install what the OpenPBS test complex needs, once: the Debian packages in
# tests/pbs/apt-packages.txt, and OpenPBS built from the vendored source
# (shared/vendor/openpbs-<commit>.tar.gz) into $AEGIS_CACHE/openpbs
# (default ~/.cache/aegis/openpbs). Quick (well under a second) when done.
#
#   bash tests/pbs/setup.sh [--rebuild]
#
# The first build takes 3-6 minutes on 2 cores (autogen 15 s, configure 30 s,
# make 2-4 min, install 10 s). Nothing is written outside the prefix and the
# apt packages: make install's /etc/profile.d and systemd unit files are
# redirected into the prefix. Needs root (apt; the complex runs as root).
set -Eeuo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rebuild=0
case "${1:-}" in
    --rebuild) rebuild=1 ;;
    "") ;;
    *) die "unknown argument '$1' (usage: setup.sh [--rebuild])" ;;
esac
[ "$(id -u)" -eq 0 ] || die "needs root (apt-get, and the complex runs its daemons as root)"

# Configure arguments; a change rebuilds. The build uses Debian's python3 (not
# a pyenv/venv python that may come first on PATH: its path is compiled in).
CONFIGURE_ARGS=(--prefix="$PREFIX" --with-pbs-server-home="$STATE"
    --with-pbs-conf-file="$PBS_CONF" --with-python=/usr)
STAMP="v1 $PBS_COMMIT ${CONFIGURE_ARGS[*]} $(/usr/bin/python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo nopython)"

# --- Debian packages ----------------------------------------------------------
mapfile -t wanted < <(grep -vE '^\s*(#|$)' "$PBS_TESTS_DIR/apt-packages.txt")
mapfile -t installed < <(dpkg-query -W -f='${Package} ${Status}\n' "${wanted[@]}" 2>/dev/null |
    awk '$NF == "installed" {print $1}')
missing=()
for pkg in "${wanted[@]}"; do
    printf '%s\n' "${installed[@]}" | grep -qxF "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- OpenPBS --------------------------------------------------------------------
built() {
    [ "$(cat "$PREFIX/.aegis-stamp" 2>/dev/null)" = "$STAMP" ] && [ -x "$PREFIX/sbin/pbs_server.bin" ]
}
# As the RPM (openpbs.spec) does: pbs_iff and pbs_rcp setuid root, so that
# commands run by other users can authenticate (resvport: pbs_iff binds a
# privileged port).
setuid_tools() {
    local f
    for f in "$1/sbin/pbs_iff" "$1/sbin/pbs_rcp"; do
        [ -u "$f" ] || chmod 4755 "$f"
    done
}
if [ "$rebuild" -eq 0 ] && built; then
    setuid_tools "$PREFIX"
    exit 0
fi
if [ -z "$PBS_TARBALL" ] || [ ! -f "$PBS_TARBALL" ]; then
    die "the OpenPBS source openpbs-$PBS_COMMIT.tar.gz is not in shared/vendor/ (set AEGIS_PBS_TARBALL)"
fi
mkdir -p "$PBS_CACHE"
exec 8>>"$PBS_CACHE/openpbs.lock"
flock -w 1800 8 || die "another setup.sh holds $PBS_CACHE/openpbs.lock"
if [ "$rebuild" -eq 0 ] && built; then   # built by whoever held the lock
    exit 0
fi

t0=$SECONDS
build="$(mktemp -d "$PBS_CACHE/openpbs-build.XXXXXX")"
trap 'rm -rf "$build"' EXIT
log_file="$PBS_CACHE/openpbs-build.log"
say "building OpenPBS $PBS_COMMIT into $PREFIX (3-6 min; log: $log_file)"
step() {
    local what="$1" t=$SECONDS; shift
    if ! "$@" >>"$log_file" 2>&1; then
        say "$what failed; the end of $log_file:"
        tail -n 30 "$log_file" >&2
        exit 1
    fi
    say "$what: $((SECONDS - t)) s"
}
: >"$log_file"
tar -xzf "$PBS_TARBALL" -C "$build"
src="$build/openpbs-$PBS_COMMIT"
cd "$src"
# A plain PATH: no pyenv shims or venvs (configure records the python it finds).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHON=/usr/bin/python3
step "autogen" ./autogen.sh
step "configure" ./configure "${CONFIGURE_ARGS[@]}"
step "make" make -j "$(nproc)"
stage="$build/stage"
step "make install" make install DESTDIR="$stage" \
    sysprofiledir="$PREFIX/etc/profile.d" unitfiledir="$PREFIX/lib/systemd/system"
setuid_tools "$stage$PREFIX"
# Swap the new tree in (the old one, if any, goes only once the new one is complete).
rm -rf "$PREFIX.new" "$PREFIX.old"
mv "$stage$PREFIX" "$PREFIX.new"
printf '%s\n' "$STAMP" >"$PREFIX.new/.aegis-stamp"
[ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
mv "$PREFIX.new" "$PREFIX"
rm -rf "$PREFIX.old" "$HOME_TEMPLATE"   # the PBS_HOME template belongs to the old build
say "OpenPBS $("$PREFIX/bin/qstat" --version | sed 's/.*= //') installed in $PREFIX in $((SECONDS - t0)) s"
