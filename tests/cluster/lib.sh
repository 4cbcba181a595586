# Shared settings and helpers for start.sh / stop.sh (sourced, not executed).
# Every name the cluster creates on the machine is derived from these values,
# so stop.sh can find (and remove) exactly what start.sh made, even when the
# state directory is gone.
# shellcheck shell=bash disable=SC2034  # the variables are used by start.sh/stop.sh

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# State directory: configs, logs, spool, pid files, the shared job directory.
# It must not be under /tmp, because every node mounts a private /tmp.
STATE="${AEGIS_SLURM_STATE:-/var/tmp/aegis-slurm-cluster}"
NODES="${AEGIS_SLURM_NODES:-3}"                 # node1..nodeN
NODE_PREFIX="${AEGIS_SLURM_NODE_PREFIX:-node}"  # node host names
CPUS="${AEGIS_SLURM_CPUS:-8}"                   # CPUs each node claims
GPUS="${AEGIS_SLURM_GPUS:-8}"                   # fake GPUs per node
MEM_MB="${AEGIS_SLURM_MEM_MB:-16000}"           # RealMemory each node claims
TMP_SIZE="${AEGIS_SLURM_TMP_SIZE:-1g}"          # size of each node's /tmp
NET="${AEGIS_SLURM_NET:-10.77.0}"               # private /24: .1 host, .11+ nodes
PORT_BASE="${AEGIS_SLURM_PORT_BASE:-16817}"     # ctld, slurmd, dbd, mariadb
ACCOUNTING="${AEGIS_SLURM_ACCOUNTING:-1}"       # 1: slurmdbd + MariaDB (sacct works)
MIN_JOB_AGE="${AEGIS_SLURM_MIN_JOB_AGE:-30}"    # seconds squeue keeps ended jobs
# Names under /tmp that stay shared with the host inside every node (so that
# pytest's tmp_path, /tmp/pytest-of-$USER/..., is a "shared filesystem").
SHARED_TMP="${AEGIS_SLURM_SHARED_TMP:-pytest-of-$(id -un)}"
# A checkout under /tmp (a CI clone may live there) must stay visible to the nodes too:
# jobs run `python -m aegis` from it.
_aegis_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
case "$_aegis_repo" in
    /tmp/?*) _aegis_top=${_aegis_repo#/tmp/}; SHARED_TMP="$SHARED_TMP ${_aegis_top%%/*}" ;;
esac
unset _aegis_repo _aegis_top
# 1: add "address name" lines for the nodes to /etc/hosts (removed by stop.sh).
EDIT_HOSTS="${AEGIS_SLURM_EDIT_HOSTS:-1}"
# 1: point /etc/slurm/slurm.conf at the cluster's config when that file is
# absent, so plain sbatch/qsub work without SLURM_CONF (removed by stop.sh).
LINK_ETC="${AEGIS_SLURM_LINK_ETC:-1}"

# Prefix of the network namespaces (<prefix>-nodeN), veths (<prefix>-vN) and
# bridge (<prefix>-br0); a second cluster next to the first needs its own
# prefix, net, port base and state directory.
LINK_PREFIX="${AEGIS_SLURM_LINK_PREFIX:-aegis}"
CLUSTER_NAME="aegis"
BRIDGE="${LINK_PREFIX}-br0"
HOST_ADDR="${NET}.1"
CTLD_PORT="$PORT_BASE"
SLURMD_PORT="$((PORT_BASE + 1))"
DBD_PORT="$((PORT_BASE + 2))"
DB_PORT="$((PORT_BASE + 3))"
CONF="$STATE/etc/slurm.conf"
LOCK="$STATE.lock"
HOSTS_TAG="# aegis-slurm-cluster:${LINK_PREFIX}:"

node_name() { printf '%s%d' "$NODE_PREFIX" "$1"; }
node_addr() { printf '%s.%d' "$NET" "$((10 + $1))"; }
node_netns() { printf '%s-%s' "$LINK_PREFIX" "$(node_name "$1")"; }
node_veth() { printf '%s-v%d' "$LINK_PREFIX" "$1"; }

say() { printf '[aegis-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Take the cluster lock (start and stop never run at the same time).
take_lock() {
    mkdir -p "$(dirname "$LOCK")"
    exec 9>>"$LOCK"
    flock -w 120 9 || die "another start.sh/stop.sh holds $LOCK for 120 s; retry later"
}

# Process ids of the cluster's daemons (munged, mariadbd, slurmdbd, slurmctld,
# slurmd, slurmstepd) whose command line names a file in the state directory:
# found even when a partial start left no pid file.
state_pids() {
    local d exe
    for d in /proc/[0-9]*; do
        exe="$(readlink "$d/exe" 2>/dev/null)" || continue
        case "${exe##*/}" in
            munged*|mariadbd*|slurmdbd*|slurmctld*|slurmd*|slurmstepd*) ;;
            *) continue ;;
        esac
        if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$STATE/"; then
            printf '%s\n' "${d#/proc/}"
        fi
    done
}

# True while process $1 exists and is not a zombie (daemons are re-parented
# to a pid 1 that may reap them late; a zombie is as good as gone).
pid_alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != "Z" ]
}

# Terminate the given process ids: TERM, wait up to $1 s, then KILL.
end_pids() {
    local grace="$1"; shift
    [ "$#" -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
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
