# Shared settings and helpers for the OpenPBS test complex (sourced by setup.sh,
# start.sh, stop.sh and record.sh; not executed). Every name the complex creates
# on the machine is derived from these values, so stop.sh finds (and removes)
# exactly what start.sh made, even when the state directory is gone.
# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this

PBS_TESTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The OpenPBS source (a `git archive` of github.com/openpbs/openpbs, see
# shared/vendor/README.md) and where it is built and installed.
PBS_COMMIT="cd7ab5edaf03"
_aegis_repo_root="$(cd "$PBS_TESTS_DIR/../.." && pwd)"
PBS_TARBALL="${AEGIS_PBS_TARBALL:-}"
if [ -z "$PBS_TARBALL" ]; then
    for _cand in "$_aegis_repo_root/shared/vendor" "$_aegis_repo_root/../shared/vendor"; do
        if [ -f "$_cand/openpbs-$PBS_COMMIT.tar.gz" ]; then PBS_TARBALL="$_cand/openpbs-$PBS_COMMIT.tar.gz"; break; fi
    done
fi
unset _cand
PBS_CACHE="${AEGIS_CACHE:-$HOME/.cache/aegis}"
PREFIX="${AEGIS_PBS_PREFIX:-$PBS_CACHE/openpbs}"           # PBS_EXEC: bin/ sbin/ lib/ ...
# PBS_HOME and the default pbs.conf path are compiled into the binaries
# (configure --with-pbs-server-home / --with-pbs-conf-file), so commands find
# the complex without PBS_CONF_FILE. It is also the state directory: configs,
# logs, datastore, node homes, the shared job directory, pbs.env/pbs.json.
# It must not be under /tmp (every node has a private /tmp).
STATE="/var/spool/aegis-pbs"
PBS_CONF="$STATE/pbs.conf"
# A template of a freshly initialised PBS_HOME (datastore included), made by
# the first start.sh (about 10 s) and copied by later ones.
HOME_TEMPLATE="${AEGIS_PBS_HOME_TEMPLATE:-$PBS_CACHE/openpbs-home-template}"

NODES="${AEGIS_PBS_NODES:-2}"                    # pbsnode1..pbsnodeN, one pbs_mom each
NODE_PREFIX="${AEGIS_PBS_NODE_PREFIX:-pbsnode}"
CPUS="${AEGIS_PBS_CPUS:-8}"                      # resources_available.ncpus each node claims
GPUS="${AEGIS_PBS_GPUS:-8}"                      # resources_available.ngpus (nothing behind them)
TMP_SIZE="${AEGIS_PBS_TMP_SIZE:-1g}"             # each node's private /tmp
NET="${AEGIS_PBS_NET:-10.79.0}"                  # private /24: .1 server host, .11+ nodes
LINK_PREFIX="${AEGIS_PBS_LINK_PREFIX:-apbs}"     # netns <prefix>-<node>, veths <prefix>-vN, bridge <prefix>-br0
SERVER_NAME="${AEGIS_PBS_SERVER_NAME:-pbshead}"  # PBS_SERVER; resolves to $NET.1 (/etc/hosts)
# A non-root user for jobs that should run as a real site's would (pbs_mom
# ignores root's processes, see README.md); root may submit for it (qsub -u).
JOB_USER="${AEGIS_PBS_USER:-aegispbs}"
# 1: add "address name" lines for the server and the nodes to /etc/hosts (removed by stop.sh).
EDIT_HOSTS="${AEGIS_PBS_EDIT_HOSTS:-1}"
# Names under /tmp that stay shared with the host inside every node (pytest's tmp_path).
SHARED_TMP="${AEGIS_PBS_SHARED_TMP:-pytest-of-$(id -un)}"
case "$_aegis_repo_root" in
    /tmp/?*) _aegis_top=${_aegis_repo_root#/tmp/}; SHARED_TMP="$SHARED_TMP ${_aegis_top%%/*}" ;;
esac
unset _aegis_repo_root _aegis_top

BRIDGE="${LINK_PREFIX}-br0"
HOST_ADDR="${NET}.1"
HOSTS_TAG="# aegis-openpbs:${LINK_PREFIX}:"
LOCK="$STATE.lock"
# TCP ports the complex listens on (host network namespace): server, mom, rm,
# scheduler, datastore (PostgreSQL), pbs_comm.
PORTS="15001 15002 15003 15004 15007 17001"

node_name() { printf '%s%d' "$NODE_PREFIX" "$1"; }
node_addr() { printf '%s.%d' "$NET" "$((10 + $1))"; }
node_netns() { printf '%s-%s' "$LINK_PREFIX" "$(node_name "$1")"; }
node_veth() { printf '%s-v%d' "$LINK_PREFIX" "$1"; }

say() { printf '[aegis-pbs %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The complex's commands run with the PBS client environment (PATH first).
pbs() { local cmd="$1"; shift; PBS_CONF_FILE="$PBS_CONF" "$PREFIX/bin/$cmd" "$@"; }

take_lock() {
    mkdir -p "$(dirname "$LOCK")"
    exec 9>>"$LOCK"
    flock -w 120 9 || die "another start.sh/stop.sh holds $LOCK for 120 s; retry later"
}

# Process ids of the complex's daemons on the host: PBS daemons started from
# $PREFIX/sbin (only one complex can run on a machine: the ports are fixed) or
# working in the state directory (as they all do, even from another build),
# and the PostgreSQL server of its datastore (found by its data directory).
state_pids() {
    local d exe
    for d in /proc/[0-9]*; do
        exe="$(readlink "$d/exe" 2>/dev/null)" || continue
        case "$exe" in
            "$PREFIX"/sbin/*) printf '%s\n' "${d#/proc/}"; continue ;;
            */pbs_*)
                case "$(readlink "$d/cwd" 2>/dev/null)" in
                    "$STATE"/*) printf '%s\n' "${d#/proc/}" ;;
                esac
                continue ;;
            */postgres) ;;
            *) continue ;;
        esac
        if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$STATE/datastore"; then
            printf '%s\n' "${d#/proc/}"
        fi
    done
}

pid_alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != "Z" ]
}

# Signal the given pids with $2 (TERM), wait up to $1 s, then KILL what is left.
end_pids() {
    local grace="$1" sig="$2"; shift 2
    [ "$#" -gt 0 ] || return 0
    kill "-$sig" "$@" 2>/dev/null || true
    local waited=0 pid alive
    while [ "$waited" -lt $((grace * 10)) ]; do
        alive=0
        for pid in "$@"; do pid_alive "$pid" && alive=1; done
        [ "$alive" -eq 0 ] && return 0
        sleep 0.1; waited=$((waited + 1))
    done
    kill -KILL "$@" 2>/dev/null || true
    sleep 0.2
}
