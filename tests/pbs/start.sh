#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Start the OpenPBS test complex on this machine: pbs_comm, pbs_sched and
# pbs_server (with its PostgreSQL datastore) on the host, and one pbs_mom per
# node, each node in its own network namespace (veth to a bridge) with its own
# host name and a private /tmp. Builds nothing: run setup.sh first.
#
#   bash tests/pbs/start.sh [--restart]
#
# Already running and healthy: says so and exits 0 (--restart: stop, start).
# Anything left from an earlier run is removed first; a failed start cleans up
# after itself. Writes $STATE/pbs.env (shell) and $STATE/pbs.json. Needs root.
set -Eeuo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

restart=0
case "${1:-}" in
    --restart) restart=1 ;;
    "") ;;
    *) die "unknown argument '$1' (usage: start.sh [--restart])" ;;
esac

[ "$(id -u)" -eq 0 ] || die "the PBS test complex needs root (network namespaces, mounts, PBS daemons); run as root"
for cmd in ip ss nsenter unshare flock su useradd; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found; install the packages in tests/pbs/apt-packages.txt"
done
[ -x "$PREFIX/sbin/pbs_server.bin" ] || die "OpenPBS is not installed in $PREFIX; run: bash tests/pbs/setup.sh"
id postgres >/dev/null 2>&1 || die "no 'postgres' user (the datastore runs as it); install postgresql (tests/pbs/setup.sh does)"
if [ "$NODES" -lt 1 ] || [ "$NODES" -gt 200 ]; then
    die "AEGIS_PBS_NODES=$NODES must be between 1 and 200"
fi
export PBS_CONF_FILE="$PBS_CONF"
t0="${EPOCHREALTIME/./}"
take_lock

free_nodes() {
    timeout 10 "$PREFIX/bin/pbsnodes" -a 2>/dev/null | grep -cE '^\s+state = (free|job-busy|job-exclusive)$' || true
}
healthy() {
    [ -f "$STATE/pbs.env" ] || return 1
    timeout 10 "$PREFIX/bin/qstat" -B >/dev/null 2>&1 || return 1
    [ "$(free_nodes)" -eq "$NODES" ]
}

if [ "$restart" -eq 0 ] && healthy; then
    say "already running ($STATE/pbs.env); use --restart to start afresh"
    exit 0
fi
if [ -e "$STATE" ] || [ -e "/run/netns/$(node_netns 1)" ] || ip link show "$BRIDGE" >/dev/null 2>&1 ||
    [ -n "$(state_pids)" ] || grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    say "removing what an earlier run left"
    AEGIS_PBS_LOCK_HELD=1 bash "$PBS_TESTS_DIR/stop.sh" --quiet
fi

for port in $PORTS; do
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        die "TCP port $port is already in use (another PBS?); the test complex needs ports $PORTS"
    fi
done
if ip -o -4 addr show | grep -qF " ${NET}."; then
    die "the address range ${NET}.0/24 is already in use on this machine; set AEGIS_PBS_NET to a free /24 prefix"
fi

on_error() {
    local rc=$? cmd="$BASH_COMMAND" line="${BASH_LINENO[0]}"
    [ "$BASHPID" = "$$" ] || exit "$rc"
    trap - ERR
    say "start failed (exit $rc) at start.sh line $line: $cmd"
    say "last log lines:"
    local f
    for f in "$STATE"/server_logs/* "$STATE"/sched_logs/* "$STATE"/comm_logs/* "$STATE"/nodes/*/mom_logs/* \
        "$STATE"/datastore/pg_log/* "$STATE"/log/*; do
        [ -s "$f" ] || continue
        printf -- '--- %s\n' "$f" >&2
        tail -n 8 "$f" >&2
    done
    say "cleaning up (AEGIS_PBS_KEEP_STATE=1 keeps $STATE for a post-mortem)"
    AEGIS_PBS_LOCK_HELD=1 bash "$PBS_TESTS_DIR/stop.sh" --quiet || true
    exit "$rc"
}
trap on_error ERR

wait_for() {
    local secs="$1" what="$2"; shift 2
    local i
    for ((i = 0; i < secs * 10; i++)); do
        timeout 10 "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "timed out after ${secs}s waiting for $what"
    return 1
}

# --- network: a bridge on the host (the server's address), one namespace + veth per node ---
ip link add "$BRIDGE" type bridge
ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for ((i = 1; i <= NODES; i++)); do
    ns="$(node_netns "$i")"
    ip netns add "$ns"
    ip link add "$(node_veth "$i")" type veth peer name eth0 netns "$ns"
    ip link set "$(node_veth "$i")" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done
# pbs_server refuses a server name that resolves only to loopback addresses
# (hnls.c get_host_ips: "Could not find any usable IP address"), so the
# server's name lives on the bridge.
if [ "$EDIT_HOSTS" = 1 ]; then
    {
        printf '%s %s %s\n' "$HOST_ADDR" "$SERVER_NAME" "$HOSTS_TAG"
        for ((i = 1; i <= NODES; i++)); do
            printf '%s %s %s\n' "$(node_addr "$i")" "$(node_name "$i")" "$HOSTS_TAG"
        done
    } >>/etc/hosts
fi
getent hosts "$SERVER_NAME" | grep -qF "$HOST_ADDR" ||
    { say "$SERVER_NAME does not resolve to $HOST_ADDR (AEGIS_PBS_EDIT_HOSTS=0 needs another resolver)"; false; }

# --- the job user: root may submit for it (qsub -u $JOB_USER) ------------------------------
if ! id "$JOB_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --comment "aegis OpenPBS test jobs" "$JOB_USER"
fi
job_home="$(getent passwd "$JOB_USER" | cut -d: -f6)"
printf '%s root\n' "$SERVER_NAME" >"$job_home/.rhosts"
chown "$JOB_USER:" "$job_home/.rhosts"
chmod 600 "$job_home/.rhosts"
# The job user must reach $PREFIX too (pbs_mom runs pbs_demux as the job's user
# in multi-node jobs; jobs call qstat): an ACL entry lets it pass the directories
# above the prefix that others may not (e.g. /root); stop.sh removes them.
d="$PREFIX"
while [ "$d" != "/" ]; do
    d="$(dirname "$d")"
    if [ $(( 0$(stat -c %a "$d") & 1 )) -eq 0 ]; then
        if command -v setfacl >/dev/null; then
            setfacl -m "u:$JOB_USER:x" "$d"
        else
            say "warning: $JOB_USER cannot reach $PREFIX ($d) and setfacl (package acl) is missing: its multi-node jobs will fail"
        fi
    fi
done

# --- PBS_HOME -------------------------------------------------------------------------------
write_conf() {
    cat >"$PBS_CONF" <<EOF
PBS_EXEC=$PREFIX
PBS_HOME=$STATE
PBS_SERVER=$SERVER_NAME
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=0
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp
PBS_LEAF_NAME=$SERVER_NAME
EOF
}
# PBS_LEAF_NAME: the server takes its own host name from it (else from
# gethostname(), here "vm" -> 127.0.0.1 -> "localhost"), and its default
# managers are root@<that name>; commands on this host reach the server from
# $HOST_ADDR, i.e. as root@$SERVER_NAME.
qmgr() { "$PREFIX/bin/qmgr" -c "$1" >/dev/null; }
template_stamp="v2 $(cat "$PREFIX/.aegis-stamp" 2>/dev/null) $SERVER_NAME $STATE $(id -u postgres)"
if [ "$(cat "$HOME_TEMPLATE/stamp" 2>/dev/null)" != "$template_stamp" ]; then
    say "initialising PBS_HOME and its datastore (once; kept in $HOME_TEMPLATE)"
    mkdir -p "$STATE"
    mkdir -p "$STATE/log"
    version="$("$PREFIX/bin/qstat" --version | sed 's/.*= //')"
    # What pbs_postinstall does for PBS_HOME (its other steps, /etc/init.d and
    # /etc/profile.d, are skipped by "sameconf"); pbs_habitat then creates the
    # datastore, starts pbs_server -t create, creates workq and stops the server.
    write_conf   # pbs_postinstall reads PBS_HOME and PBS_EXEC from it
    "$PREFIX/libexec/pbs_postinstall" server "$version" "$PREFIX" "$STATE" "" sameconf \
        >"$STATE/log/postinstall.log" 2>&1
    [ -d "$STATE/server_priv" ] || { cat "$STATE/log/postinstall.log" >&2; false; }
    "$PREFIX/libexec/pbs_habitat" >"$STATE/log/habitat.log" 2>&1 9>&-
    grep -q "Error" "$STATE/log/habitat.log" && { cat "$STATE/log/habitat.log" >&2; false; }
    # Server settings every test wants, made once into the template.
    "$PREFIX/sbin/pbs_comm" >/dev/null 9>&-
    "$PREFIX/sbin/pbs_server" >/dev/null 2>&1 9>&-
    wait_for 60 "pbs_server" "$PREFIX/bin/qstat" -B
    qmgr "set server acl_roots = root"              # root may submit jobs (they run as root)
    qmgr "set server job_history_enable = True"     # qstat -x shows finished jobs
    qmgr "set server scheduler_iteration = 10"
    qmgr "create resource ngpus type=long, flag=nh"  # GPUs per node (a site-defined resource in PBS)
    qmgr "create resource filesystems type=string"  # ALCF's -l filesystems=...
    qmgr "create resource system type=string, flag=h"  # Polaris's select=N:system=polaris
    for q in debug prod; do
        qmgr "create queue $q queue_type=execution"
        qmgr "set queue $q enabled=True"
        qmgr "set queue $q started=True"
    done
    "$PREFIX/bin/qterm" -t quick >/dev/null
    wait_for 60 "pbs_server to stop" sh -c "! pgrep -x pbs_server.bin >/dev/null"
    mapfile -t init_pids < <(state_pids)
    end_pids 5 TERM "${init_pids[@]}"
    # pbs_sched checks only the resources named in sched_config: add ngpus.
    sed -i 's/^resources: "ncpus, mem, arch, host, vnode, aoe, eoe"/resources: "ncpus, mem, arch, host, vnode, aoe, eoe, ngpus"/' \
        "$STATE/sched_priv/sched_config"
    grep -q '^resources: .*ngpus' "$STATE/sched_priv/sched_config"
    rm -rf "$STATE"/{server_logs,sched_logs,comm_logs,mom_logs}/* "$STATE/server_priv/accounting"/*
    tmpl_new="$HOME_TEMPLATE.new.$$"
    rm -rf "$tmpl_new"
    mkdir -p "$tmpl_new"
    chmod 700 "$tmpl_new"
    cp -a "$STATE" "$tmpl_new/home"
    printf '%s\n' "$template_stamp" >"$tmpl_new/stamp"
    rm -rf "$HOME_TEMPLATE"
    mv "$tmpl_new" "$HOME_TEMPLATE"
else
    cp -a "$HOME_TEMPLATE/home" "$STATE"
fi
write_conf
# The environment of every job (pbs_mom starts jobs with it): PBS's commands
# first, as on a site, not the Slurm wrappers /usr/bin/qsub, /usr/bin/qstat.
printf 'PATH=%s/bin:/usr/local/bin:/usr/bin:/bin\n' "$PREFIX" >"$STATE/pbs_environment"
mkdir -p "$STATE/log" "$STATE/shared"
# Job shells are login shells and /etc/profile resets PATH, so every node gets
# its own /etc/profile.d (bind-mounted in its mount namespace by node-init.sh):
# the host's, plus the PBS commands first on PATH, as pbs.sh does on a site.
mkdir -p "$STATE/etc"
cp -a /etc/profile.d "$STATE/etc/profile.d"
# shellcheck disable=SC2016  # $PATH is for the job's shell
printf '# aegis OpenPBS test complex: PBS commands first (before the Slurm wrappers in /usr/bin).\nexport PATH="%s/bin:$PATH"\n' \
    "$PREFIX" >"$STATE/etc/profile.d/aegis-openpbs.sh"
chmod 644 "$STATE/etc/profile.d/aegis-openpbs.sh"
chmod 1777 "$STATE/shared"
for entry in $SHARED_TMP; do
    [ -d "/tmp/$entry" ] || install -d -m 700 "/tmp/$entry"
done

# --- node homes: each pbs_mom has its own PBS_HOME and pbs.conf --------------------------------
for ((i = 1; i <= NODES; i++)); do
    name="$(node_name "$i")"
    nh="$STATE/nodes/$name"
    mkdir -p "$nh"
    chmod 755 "$STATE/nodes"
    while read -r mode dir; do
        mkdir -p "$nh/$dir"
        chmod "$mode" "$nh/$dir"
    done <<'EOF'
0755 .
0755 aux
0700 checkpoint
0755 mom_logs
0751 mom_priv
0751 mom_priv/jobs
0750 mom_priv/hooks
0750 mom_priv/hooks/tmp
1777 spool
1777 undelivered
EOF
    cp "$STATE/pbs_environment" "$nh/pbs_environment"
    cat >"$nh/pbs.conf" <<EOF
PBS_EXEC=$PREFIX
PBS_HOME=$nh
PBS_SERVER=$SERVER_NAME
PBS_START_SERVER=0
PBS_START_SCHED=0
PBS_START_COMM=0
PBS_START_MOM=1
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp
PBS_LEAF_NAME=$name
EOF
    # $usecp: every path is on a shared file system (cp, not scp, for -o/-e);
    # min/max_check_poll: walltime and usage are checked every 1-2 s, not 10-120 s.
    cat >"$nh/mom_priv/config" <<EOF
\$clienthost $SERVER_NAME
\$usecp *:/ /
\$min_check_poll 1
\$max_check_poll 2
\$logevent 0x1ff
EOF
    chmod 644 "$nh/mom_priv/config"
done

# --- daemons ------------------------------------------------------------------------------------
"$PREFIX/sbin/pbs_comm" >"$STATE/log/pbs_comm.out" 2>&1 9>&-
"$PREFIX/sbin/pbs_sched" >"$STATE/log/pbs_sched.out" 2>&1 9>&-
# pbs_server starts the datastore (PostgreSQL) itself; about 2 s.
"$PREFIX/sbin/pbs_server" >"$STATE/log/pbs_server.out" 2>&1 9>&-
wait_for 60 "pbs_server" "$PREFIX/bin/qstat" -B
for ((i = 1; i <= NODES; i++)); do
    name="$(node_name "$i")"
    qmgr "create node $name"
    qmgr "set node $name resources_available.ncpus = $CPUS"
    if [ "$GPUS" -gt 0 ]; then qmgr "set node $name resources_available.ngpus = $GPUS"; fi
done
# Queue limits, set on every start (a template made before they existed lacks some): qsub refuses a
# job outside them ("qsub: Job violates queue and/or server resource limits", exit 188;
# tests/pbs/recorded/README.md). The queue table of tests/sched/sites/testpbs.yaml states the same limits;
# tests/sched/test_pbs_real.py checks that the server's (qstat -Q -f) and the table agree. Both are for
# the default 2 nodes (AEGIS_PBS_NODES does not change them).
while read -r line; do
    [ -n "$line" ] && qmgr "$line"
done <<'EOF'
set queue debug resources_min.nodect = 1
set queue debug resources_max.nodect = 2
set queue debug resources_max.walltime = 01:00:00
set queue debug resources_default.walltime = 00:30:00
set queue workq resources_min.nodect = 1
set queue workq resources_max.nodect = 2
set queue workq resources_max.walltime = 24:00:00
set queue prod resources_min.nodect = 2
set queue prod resources_max.nodect = 2
set queue prod resources_max.walltime = 24:00:00
EOF
for ((i = 1; i <= NODES; i++)); do
    name="$(node_name "$i")"
    # nsenter, not "ip netns exec" (which remounts /sys), as for the Slurm cluster.
    nsenter --net="/run/netns/$(node_netns "$i")" unshare --uts --mount --propagation private -- \
        bash "$PBS_TESTS_DIR/node-init.sh" "$name" "$PREFIX" "$STATE/nodes/$name/pbs.conf" "$TMP_SIZE" \
        "$SHARED_TMP" "$STATE/nodes/$name/host-tmp" "$STATE/etc/profile.d" >"$STATE/log/mom-$name.out" 2>&1 9>&-
done
wait_for 60 "$NODES nodes to be free" sh -c \
    "[ \"\$('$PREFIX/bin/pbsnodes' -a | grep -c '^ *state = free\$')\" -eq $NODES ]"

# --- facts for the tests ---------------------------------------------------------------------
node_list="" addr_list=""
for ((i = 1; i <= NODES; i++)); do
    node_list+="$(node_name "$i") "
    addr_list+="$(node_addr "$i") "
done
node_list="${node_list% }" addr_list="${addr_list% }"
{
    printf '# The aegis OpenPBS test complex (written by tests/pbs/start.sh).\n'
    printf "PBS_CONF_FILE='%s'\n" "$PBS_CONF"
    printf "PBS_EXEC='%s'\n" "$PREFIX"
    printf "AEGIS_PBS_BIN='%s'\n" "$PREFIX/bin"
    printf "AEGIS_PBS_STATE='%s'\n" "$STATE"
    printf "AEGIS_PBS_SERVER='%s'\n" "$SERVER_NAME"
    printf "AEGIS_PBS_NODES='%s'\n" "$node_list"
    printf "AEGIS_PBS_NODE_ADDRS='%s'\n" "$addr_list"
    printf "AEGIS_PBS_HOST_ADDR='%s'\n" "$HOST_ADDR"
    printf "AEGIS_PBS_QUEUES='workq debug prod'\n"
    printf "AEGIS_PBS_DEFAULT_QUEUE='workq'\n"
    printf "AEGIS_PBS_CPUS_PER_NODE='%s'\n" "$CPUS"
    printf "AEGIS_PBS_GPUS_PER_NODE='%s'\n" "$GPUS"
    printf "AEGIS_PBS_USER='%s'\n" "$JOB_USER"
    printf "AEGIS_PBS_SHARED_DIR='%s'\n" "$STATE/shared"
    printf "AEGIS_PBS_SHARED_TMP='%s'\n" "$SHARED_TMP"
} >"$STATE/pbs.env.tmp"
mv "$STATE/pbs.env.tmp" "$STATE/pbs.env"
json_list() { local out="" x; for x in "$@"; do out+="\"$x\", "; done; printf '[%s]' "${out%, }"; }
{
    printf '{\n  "pbs_conf_file": "%s",\n  "pbs_exec": "%s",\n  "state_dir": "%s",\n' "$PBS_CONF" "$PREFIX" "$STATE"
    printf '  "server": "%s",\n  "host_address": "%s",\n' "$SERVER_NAME" "$HOST_ADDR"
    # shellcheck disable=SC2086
    printf '  "nodes": %s,\n  "node_addresses": %s,\n' "$(json_list $node_list)" "$(json_list $addr_list)"
    printf '  "queues": ["workq", "debug", "prod"],\n  "default_queue": "workq",\n'
    printf '  "cpus_per_node": %d,\n  "gpus_per_node": %d,\n' "$CPUS" "$GPUS"
    printf '  "job_user": "%s",\n  "shared_dir": "%s"\n}\n' "$JOB_USER" "$STATE/shared"
} >"$STATE/pbs.json.tmp"
mv "$STATE/pbs.json.tmp" "$STATE/pbs.json"
trap - ERR
elapsed_ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
say "up in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s: server $SERVER_NAME ($HOST_ADDR), nodes $node_list ($addr_list), queues workq (default), debug, prod; source $STATE/pbs.env"
