#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Stop the aegis test Slurm cluster and remove everything start.sh made: the
# daemons and every process inside the node namespaces (jobs included), the
# network namespaces, veths and bridge, the /etc/hosts lines, the
# /etc/slurm/slurm.conf link, and the state directory. Safe to run at any
# time, also after a partial start or when nothing is running.
#
#   bash tests/cluster/stop.sh [--quiet]
#
# AEGIS_SLURM_KEEP_STATE=1 keeps the state directory (logs) for a post-mortem.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
note() { [ "$quiet" -eq 1 ] || say "$@"; }

[ "$(id -u)" -eq 0 ] || die "stopping the test cluster needs root; run as root"
t0="${EPOCHREALTIME/./}"
[ "${AEGIS_SLURM_LOCK_HELD:-0}" = 1 ] || take_lock

# Node namespaces of this cluster: aegis-<prefix><number>.
our_netns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${LINK_PREFIX}-${NODE_PREFIX}[0-9]+\$" || true
}

# 1. Every process in a node namespace: slurmd, slurmstepd, job tasks.
mapfile -t namespaces < <(our_netns)
node_pids=()
for ns in "${namespaces[@]}"; do
    [ -n "$ns" ] || continue
    mapfile -t -O "${#node_pids[@]}" node_pids < <(ip netns pids "$ns" 2>/dev/null)
done

# 2. Daemons on the host (slurmctld, slurmdbd, mariadbd, munged), found by
#    their pid files and by the state directory in their command lines.
daemon_pids=()
for pidfile in "$STATE"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
        */munged*|*/mariadbd*|*/slurmdbd*|*/slurmctld*|*/slurmd*) daemon_pids+=("$pid") ;;
    esac
done
mapfile -t -O "${#daemon_pids[@]}" daemon_pids < <(state_pids)
# Everything is thrown away, so nobody needs a clean shutdown: TERM all at
# once, KILL what is left after 2 s.
mapfile -t all_pids < <(printf '%s\n' "${node_pids[@]}" "${daemon_pids[@]}" | grep . | sort -u)
if [ "${#all_pids[@]}" -gt 0 ]; then
    note "ending ${#daemon_pids[@]} daemons and ${#node_pids[@]} processes in ${#namespaces[@]} node namespaces"
    end_pids 2 "${all_pids[@]}"
fi

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
# ip netns leaves /run/netns mounted; drop it once no namespace is left in it.
if [ -d /run/netns ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
    if grep -qE '^[^ ]+ /run/netns ' /proc/mounts; then umount /run/netns 2>/dev/null; fi
    rmdir /run/netns 2>/dev/null
fi

# 4. Files outside the state directory.
if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    # Rewrite in place: /etc/hosts may be a bind mount that cannot be replaced.
    kept="$(grep -vF "$HOSTS_TAG" /etc/hosts)"
    printf '%s\n' "$kept" >/etc/hosts
fi
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
fi

# 5. The state directory.
if [ "${AEGIS_SLURM_KEEP_STATE:-0}" = 1 ]; then
    rm -f "$STATE/cluster.env" "$STATE/cluster.json"
    note "kept $STATE (AEGIS_SLURM_KEEP_STATE=1)"
elif [ -e "$STATE" ]; then
    rm -rf --one-file-system "$STATE"
fi

left=()
[ -n "$(our_netns)" ] && left+=("network namespaces")
ip link show "$BRIDGE" >/dev/null 2>&1 && left+=("bridge $BRIDGE")
[ -n "$(state_pids)" ] && left+=("daemons $(state_pids | tr '\n' ' ')")
[ "${AEGIS_SLURM_LOCK_HELD:-0}" = 1 ] || rm -f "$LOCK"
if [ "${#left[@]}" -gt 0 ]; then
    die "could not remove: ${left[*]}"
fi
elapsed_ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
note "stopped and cleaned up in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s"
