#!/bin/bash
# shellcheck source-path=SCRIPTDIR disable=SC2034  # render() reads variables by name
# Start the aegis test Slurm cluster on this machine: munged, MariaDB +
# slurmdbd (accounting), slurmctld, and one slurmd per node, each node in its
# own network namespace (veth to a bridge), with its own host name and a
# private /tmp. Writes $STATE/cluster.env and $STATE/cluster.json.
#
#   bash tests/cluster/start.sh [--restart]
#
# Already running and healthy: says so and exits 0 (--restart: stop, start).
# Anything left from an earlier run (even a partial start) is removed first.
# Needs root. Settings: the AEGIS_SLURM_* variables at the top of lib.sh.
set -Eeuo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

restart=0
case "${1:-}" in
    --restart) restart=1 ;;
    "") ;;
    *) die "unknown argument '$1' (usage: start.sh [--restart])" ;;
esac

[ "$(id -u)" -eq 0 ] || die "the test cluster needs root (network namespaces, mounts); run as root"
for cmd in ip ss nsenter unshare flock munged slurmctld slurmd sbatch scontrol sinfo qsub; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found; install the packages in tests/apt-packages.txt (bash tests/run.sh does)"
done
if [ "$ACCOUNTING" = 1 ]; then
    for cmd in mariadbd mariadb-install-db mariadb slurmdbd sacctmgr; do
        command -v "$cmd" >/dev/null || die "'$cmd' not found; install mariadb-server-core, mariadb-client-core and slurmdbd, or set AEGIS_SLURM_ACCOUNTING=0"
    done
fi
case "$STATE/" in
    /tmp/*) die "AEGIS_SLURM_STATE=$STATE is under /tmp, which every node hides behind its private /tmp; choose another directory" ;;
esac
if [ "$NODES" -lt 1 ] || [ "$NODES" -gt 200 ]; then
    die "AEGIS_SLURM_NODES=$NODES must be between 1 and 200"
fi

export SLURM_CONF="$CONF"
t0="${EPOCHREALTIME/./}"
take_lock

healthy() {
    [ -f "$STATE/cluster.env" ] || return 1
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    # Every node answers (no "*" suffix) and is usable (idle, allocated, completing...).
    local ok
    ok="$(timeout 10 sinfo -h -N -p debug -o '%t' 2>/dev/null |
        grep -cE '^(idle|mix|alloc|comp|resv|plnd)$' || true)"
    [ "$ok" -eq "$NODES" ]
}

if [ "$restart" -eq 0 ] && healthy; then
    say "already running ($STATE/cluster.env); use --restart to start afresh"
    exit 0
fi
if [ -e "$STATE" ] || [ -e "/run/netns/$(node_netns 1)" ] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "removing what an earlier run left"
    AEGIS_SLURM_LOCK_HELD=1 bash "$CLUSTER_DIR/stop.sh" --quiet
fi

for port in "$CTLD_PORT" "$DBD_PORT" "$DB_PORT"; do
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        die "TCP port $port is already in use (another Slurm or database?); set AEGIS_SLURM_PORT_BASE to a free range of 4 ports"
    fi
done

on_error() {
    local rc=$? cmd="$BASH_COMMAND" line="${BASH_LINENO[0]}"
    [ "$BASHPID" = "$$" ] || exit "$rc"   # a subshell: the main shell reports
    trap - ERR
    say "start failed (exit $rc) at start.sh line $line: $cmd"
    say "last log lines:"
    local f
    for f in "$STATE"/log/*.log; do
        [ -s "$f" ] || continue
        printf -- '--- %s\n' "$f" >&2
        tail -n 8 "$f" >&2
    done
    say "cleaning up (logs kept in $STATE/log only when AEGIS_SLURM_KEEP_STATE=1)"
    AEGIS_SLURM_LOCK_HELD=1 bash "$CLUSTER_DIR/stop.sh" --quiet || true
    exit "$rc"
}
trap on_error ERR

# Wait until "$@" succeeds, up to $1 seconds; die with $2 otherwise.
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

# Substitute @NAME@ placeholders with the values of the named shell variables.
render() {
    local src="$1" dst="$2"; shift 2
    local text var
    text="$(<"$src")"
    for var in "$@"; do text="${text//@${var}@/${!var}}"; done
    if [[ "$text" =~ @[A-Z_]+@ ]]; then
        say "unfilled placeholder ${BASH_REMATCH[0]} in $src"; return 1
    fi
    printf '%s\n' "$text" >"$dst"
}

# --- state directory --------------------------------------------------------
mkdir -p "$STATE"/{etc,log,run,ctld,munge,fakegpu,pbs/aux,shared}
chmod 755 "$STATE/munge"   # the key inside is 0400
chmod 1777 "$STATE/shared"
# Fake GPUs: null character devices (Slurm wants device files; with plain
# files it logs errors and sets no CUDA_VISIBLE_DEVICES), plain files where
# mknod is not allowed.
for ((g = 0; g < GPUS; g++)); do
    mknod -m 666 "$STATE/fakegpu/gpu$g" c 1 3 2>/dev/null || : >"$STATE/fakegpu/gpu$g"
done
for ((i = 1; i <= NODES; i++)); do mkdir -p "$STATE/nodes/$(node_name "$i")/spool"; done
for entry in $SHARED_TMP; do
    [ -d "/tmp/$entry" ] || install -d -m 700 "/tmp/$entry"
done

# --- munge (its own key and socket, not the system's) -----------------------
head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" \
    --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/run/munged.pid" \
    --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munge.seed" 9>&-
wait_for 10 munged test -S "$STATE/munge/munge.socket"

# --- network: a bridge on the host, one namespace + veth per node -----------
if ip -o -4 addr show | grep -qF " ${NET}."; then
    say "the address range ${NET}.0/24 is already in use on this machine; set AEGIS_SLURM_NET to a free /24 prefix (e.g. 10.78.0)"
    false
fi
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

if [ "$EDIT_HOSTS" = 1 ]; then
    {
        for ((i = 1; i <= NODES; i++)); do
            printf '%s %s %s\n' "$(node_addr "$i")" "$(node_name "$i")" "$HOSTS_TAG"
        done
    } >>/etc/hosts
fi

# --- configuration ----------------------------------------------------------
CTLD_HOST="$(hostname -s)"
NODE_RANGE="${NODE_PREFIX}[1-$NODES]"
[ "$NODES" -gt 1 ] || NODE_RANGE="$(node_name 1)"
LAST_GPU=$((GPUS - 1))
NODE_LINES=""
for ((i = 1; i <= NODES; i++)); do
    NODE_LINES+="NodeName=$(node_name "$i") NodeHostname=$(node_name "$i") NodeAddr=$(node_addr "$i")"
    NODE_LINES+=" CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
    NODE_LINES+=" RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"$'\n'
done
if [ "$ACCOUNTING" = 1 ]; then
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST_ADDR
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$STATE/munge/munge.socket
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
render "$CLUSTER_DIR/slurm.conf.in" "$CONF" CLUSTER_NAME CTLD_HOST HOST_ADDR \
    CTLD_PORT SLURMD_PORT STATE MIN_JOB_AGE ACCOUNTING_LINES NODE_LINES
render "$CLUSTER_DIR/gres.conf.in" "$STATE/etc/gres.conf" NODE_RANGE STATE LAST_GPU
render "$CLUSTER_DIR/task_prolog.sh.in" "$STATE/etc/task_prolog.sh" STATE
render "$CLUSTER_DIR/epilog_slurmctld.sh.in" "$STATE/etc/epilog_slurmctld.sh" STATE
chmod 755 "$STATE/etc/task_prolog.sh" "$STATE/etc/epilog_slurmctld.sh"

# --- accounting: MariaDB on loopback + slurmdbd ------------------------------
# The first start builds the database (MariaDB system tables, Slurm's tables,
# cluster, accounts: about 10 s) and keeps a copy, stopped cleanly, in
# $DB_TEMPLATE; later starts copy it. A fresh random password for the
# database user is set at every start; it lives only in slurmdbd.conf (0600).
DB_TEMPLATE="${AEGIS_SLURM_DB_TEMPLATE:-${AEGIS_CACHE:-$HOME/.cache/aegis}/slurm-db-template}"
DB_OPTS=(--no-defaults --user=root --skip-name-resolve --skip-log-bin
    --performance-schema=OFF --innodb-buffer-pool-size=16M
    --innodb-log-file-size=8M --innodb-flush-log-at-trx-commit=0
    --innodb-undo-tablespaces=2 --innodb-undo-log-truncate=ON --innodb-max-undo-log-size=10M)
sql() { mariadb --no-defaults --socket="$STATE/db/mariadb.sock" -uroot; }
start_db() {
    mariadbd "${DB_OPTS[@]}" --datadir="$STATE/db/data" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$STATE/db/mariadb.sock" \
        --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadb.log" \
        >/dev/null 2>&1 9>&- &
    wait_for 30 mariadbd mariadb --no-defaults --socket="$STATE/db/mariadb.sock" -uroot -e 'select 1'
}
start_dbd() {
    local DB_PASS
    DB_PASS="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
    sql <<<"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';"
    (umask 077 && render "$CLUSTER_DIR/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf" \
        CTLD_HOST HOST_ADDR DBD_PORT STATE DB_PORT DB_PASS)
    slurmdbd 9>&-
    wait_for 60 slurmdbd sacctmgr -n list cluster
}
# Stop the daemon whose pid file is $1 and wait until it has exited.
stop_pidfile() {
    local pid
    pid="$(cat "$1")"
    kill -TERM "$pid"
    local i
    for ((i = 0; i < 600; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    say "$1: process $pid did not exit within 60 s"
    return 1
}
db_stamp="v1 $(mariadbd --version) $(slurmctld -V)"
if [ "$ACCOUNTING" = 1 ]; then
    mkdir -p "$STATE/db"
    if [ "$(cat "$DB_TEMPLATE/stamp" 2>/dev/null)" = "$db_stamp" ]; then
        cp -a "$DB_TEMPLATE/data" "$STATE/db/data"
        start_db
        start_dbd
    else
        say "building the accounting database (once; kept in $DB_TEMPLATE)"
        mariadb-install-db "${DB_OPTS[@]}" --datadir="$STATE/db/data" \
            --auth-root-authentication-method=normal --skip-test-db \
            >"$STATE/log/mariadb-install.log" 2>&1
        start_db
        sql <<SQL
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
        start_dbd
        timeout 30 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
        timeout 30 sacctmgr -i add account aegis,other Description=test Organization=aegis >/dev/null
        timeout 30 sacctmgr -i add user root Account=aegis,other DefaultAccount=aegis >/dev/null
        stop_pidfile "$STATE/run/slurmdbd.pid"
        stop_pidfile "$STATE/run/mariadbd.pid"
        tmpl_new="$DB_TEMPLATE.new.$$"
        rm -rf "$tmpl_new"
        mkdir -p "$tmpl_new"
        chmod 700 "$tmpl_new"
        cp -a "$STATE/db/data" "$tmpl_new/data"
        printf '%s\n' "$db_stamp" >"$tmpl_new/stamp"
        rm -rf "$DB_TEMPLATE"
        mv "$tmpl_new" "$DB_TEMPLATE"
        start_db
        start_dbd
    fi
fi

# --- controller --------------------------------------------------------------
slurmctld -f "$CONF" -i 9>&-
wait_for 30 slurmctld sh -c 'scontrol ping | grep -q "is UP"'

# --- nodes: one slurmd per namespace ----------------------------------------
for ((i = 1; i <= NODES; i++)); do
    # nsenter, not "ip netns exec": that remounts /sys and hides the cgroup
    # mounts slurmd insists on finding.
    nsenter --net="/run/netns/$(node_netns "$i")" unshare --uts --mount --propagation private -- \
        "$CLUSTER_DIR/node-init.sh" "$(node_name "$i")" "$STATE" "$CONF" "$TMP_SIZE" "$SHARED_TMP" 9>&-
done
wait_for 60 "$NODES nodes to register idle" sh -c \
    "[ \"\$(sinfo -h -N -p debug -o %t | grep -c '^idle')\" -eq $NODES ]"

if [ "$LINK_ETC" = 1 ] && [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    mkdir -p /etc/slurm
    ln -s "$CONF" /etc/slurm/slurm.conf
fi

# --- facts for the tests ------------------------------------------------------
node_list="" addr_list=""
for ((i = 1; i <= NODES; i++)); do
    node_list+="$(node_name "$i") "
    addr_list+="$(node_addr "$i") "
done
node_list="${node_list% }" addr_list="${addr_list% }"
{
    printf '# The aegis test Slurm cluster (written by tests/cluster/start.sh).\n'
    printf "SLURM_CONF='%s'\n" "$CONF"
    printf "AEGIS_SLURM_STATE='%s'\n" "$STATE"
    printf "AEGIS_SLURM_CLUSTER='%s'\n" "$CLUSTER_NAME"
    printf "AEGIS_SLURM_NODES='%s'\n" "$node_list"
    printf "AEGIS_SLURM_NODE_ADDRS='%s'\n" "$addr_list"
    printf "AEGIS_SLURM_HOST_ADDR='%s'\n" "$HOST_ADDR"
    printf "AEGIS_SLURM_PARTITIONS='debug long'\n"
    printf "AEGIS_SLURM_DEFAULT_PARTITION='debug'\n"
    printf "AEGIS_SLURM_ACCOUNTS='%s'\n" "$([ "$ACCOUNTING" = 1 ] && echo 'aegis other' || echo '')"
    printf "AEGIS_SLURM_ACCOUNTING='%s'\n" "$ACCOUNTING"
    printf "AEGIS_SLURM_CPUS_PER_NODE='%s'\n" "$CPUS"
    printf "AEGIS_SLURM_GPUS_PER_NODE='%s'\n" "$GPUS"
    printf "AEGIS_SLURM_SHARED_DIR='%s'\n" "$STATE/shared"
    printf "AEGIS_SLURM_SHARED_TMP='%s'\n" "$SHARED_TMP"
    printf "AEGIS_SLURM_PBS_AUX='%s'\n" "$STATE/pbs/aux"
} >"$STATE/cluster.env.tmp"
mv "$STATE/cluster.env.tmp" "$STATE/cluster.env"
json_list() { local out="" x; for x in "$@"; do out+="\"$x\", "; done; printf '[%s]' "${out%, }"; }
{
    printf '{\n  "slurm_conf": "%s",\n  "state_dir": "%s",\n' "$CONF" "$STATE"
    printf '  "cluster": "%s",\n  "host_address": "%s",\n' "$CLUSTER_NAME" "$HOST_ADDR"
    # shellcheck disable=SC2086
    printf '  "nodes": %s,\n  "node_addresses": %s,\n' "$(json_list $node_list)" "$(json_list $addr_list)"
    printf '  "partitions": ["debug", "long"],\n  "default_partition": "debug",\n'
    printf '  "accounting": %s,\n' "$([ "$ACCOUNTING" = 1 ] && echo true || echo false)"
    printf '  "cpus_per_node": %d,\n  "gpus_per_node": %d,\n' "$CPUS" "$GPUS"
    printf '  "shared_dir": "%s",\n  "pbs_aux_dir": "%s"\n}\n' "$STATE/shared" "$STATE/pbs/aux"
} >"$STATE/cluster.json.tmp"
mv "$STATE/cluster.json.tmp" "$STATE/cluster.json"
trap - ERR
elapsed_ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
say "up in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s: nodes $node_list ($addr_list), partitions debug (default) and long; source $STATE/cluster.env"
