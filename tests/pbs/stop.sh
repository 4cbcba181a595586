#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Stop the OpenPBS test complex and remove everything start.sh made: the
# daemons (pbs_server, its PostgreSQL, pbs_sched, pbs_comm, every pbs_mom) and
# every process inside the node namespaces (jobs included), the network
# namespaces, veths and bridge, the /etc/hosts lines and the state directory.
# Safe to run at any time, also after a partial start or when nothing runs.
# It leaves the job user (AEGIS_PBS_USER, created once by start.sh; its ACL
# entries on the directories above the build are removed), the build
# ($AEGIS_CACHE/openpbs) and the PBS_HOME template.
#
#   bash tests/pbs/stop.sh [--quiet]
#
# AEGIS_PBS_KEEP_STATE=1 keeps the state directory (logs) for a post-mortem.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
note() { [ "$quiet" -eq 1 ] || say "$@"; }

[ "$(id -u)" -eq 0 ] || die "stopping the PBS test complex needs root; run as root"
t0="${EPOCHREALTIME/./}"
[ "${AEGIS_PBS_LOCK_HELD:-0}" = 1 ] || take_lock

our_netns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${LINK_PREFIX}-${NODE_PREFIX}[0-9]+\$" || true
}

# 1. Every process in a node namespace: pbs_mom and the jobs' processes.
mapfile -t namespaces < <(our_netns)
node_pids=()
for ns in "${namespaces[@]}"; do
    [ -n "$ns" ] || continue
    mapfile -t -O "${#node_pids[@]}" node_pids < <(ip netns pids "$ns" 2>/dev/null)
done
# 2. The daemons on the host. Everything is thrown away, so nobody needs a
#    clean shutdown: TERM all at once (pbs_server then stops its datastore),
#    KILL what is left after 1 s; then the datastore's PostgreSQL, if still up
#    (SIGQUIT: immediate shutdown, it removes its shared memory).
mapfile -t daemon_pids < <(state_pids)
mapfile -t all_pids < <(printf '%s\n' "${node_pids[@]}" "${daemon_pids[@]}" | grep . | sort -u)
if [ "${#all_pids[@]}" -gt 0 ]; then
    note "ending ${#daemon_pids[@]} daemons and ${#node_pids[@]} processes in ${#namespaces[@]} node namespaces"
    end_pids 1 TERM "${all_pids[@]}"
fi
mapfile -t left_pids < <(state_pids)
[ "${#left_pids[@]}" -eq 0 ] || end_pids 3 QUIT "${left_pids[@]}"

# 3. Network: namespaces (their veth ends go with them), host veths, bridge.
for ns in "${namespaces[@]}"; do
    [ -n "$ns" ] || continue
    ip netns del "$ns" 2>/dev/null || note "could not delete network namespace $ns"
done
while read -r link; do
    [ -n "$link" ] && ip link del "$link" 2>/dev/null
done < <(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
         grep -E "^${LINK_PREFIX}-v[0-9]+\$" || true)
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
if [ -d /run/netns ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
    if grep -qE '^[^ ]+ /run/netns ' /proc/mounts; then umount /run/netns 2>/dev/null; fi
    rmdir /run/netns 2>/dev/null
fi

# 4. /etc/hosts (rewritten in place: it may be a bind mount; other tools' lines stay).
if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    kept="$(grep -vF "$HOSTS_TAG" /etc/hosts)"
    printf '%s\n' "$kept" >/etc/hosts
fi

# 5. The job user's ACL entries on the directories above $PREFIX (start.sh made them).
if command -v getfacl >/dev/null; then
    d="$PREFIX"
    while [ "$d" != "/" ]; do
        d="$(dirname "$d")"
        if getfacl -p --omit-header "$d" 2>/dev/null | grep -q "^user:$JOB_USER:"; then
            setfacl -x "u:$JOB_USER" "$d" 2>/dev/null || note "could not remove the ACL entry for $JOB_USER on $d"
        fi
    done
fi

# 6. The state directory.
if [ "${AEGIS_PBS_KEEP_STATE:-0}" = 1 ]; then
    rm -f "$STATE/pbs.env" "$STATE/pbs.json"
    note "kept $STATE (AEGIS_PBS_KEEP_STATE=1)"
elif [ -e "$STATE" ]; then
    rm -rf --one-file-system "$STATE"
fi

left=()
[ -n "$(our_netns)" ] && left+=("network namespaces")
ip link show "$BRIDGE" >/dev/null 2>&1 && left+=("bridge $BRIDGE")
[ -n "$(state_pids)" ] && left+=("daemons $(state_pids | tr '\n' ' ')")
[ "${AEGIS_PBS_LOCK_HELD:-0}" = 1 ] || rm -f "$LOCK"
if [ "${#left[@]}" -gt 0 ]; then
    die "could not remove: ${left[*]}"
fi
elapsed_ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
note "stopped and cleaned up in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s"
