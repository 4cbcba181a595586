#!/bin/bash
# Runs inside one node's network, UTS and mount namespaces (see start.sh): sets
# the node's host name, mounts its private /tmp and /dev/shm (keeping the names
# in SHARED_TMP shared with the host), then starts its pbs_mom, which reads the
# node's own pbs.conf (PBS_HOME = the node's directory under the state dir).
# PROFILE_DIR replaces /etc/profile.d on the node (PBS commands on PATH in jobs).
#   node-init.sh NAME PBS_EXEC NODE_CONF TMP_SIZE "SHARED_TMP_NAMES" HOLD_DIR PROFILE_DIR
set -euo pipefail
name="$1" exec_dir="$2" conf="$3" tmp_size="$4" shared="$5" hold="$6" profile_dir="$7"

hostname "$name"
mkdir -p "$hold"
mount --bind /tmp "$hold"
mount -t tmpfs -o "size=$tmp_size,mode=1777" "tmp-$name" /tmp
for entry in $shared; do
    [ -d "$hold/$entry" ] || continue
    mkdir -p "/tmp/$entry"
    mount --bind "$hold/$entry" "/tmp/$entry"
done
umount "$hold"
mount -t tmpfs -o "mode=1777" "shm-$name" /dev/shm
mount --bind "$profile_dir" /etc/profile.d
export PBS_CONF_FILE="$conf"
exec "$exec_dir/sbin/pbs_mom"
