#!/bin/bash
# Runs inside one node's network, UTS and mount namespaces (see start.sh):
# sets the node's host name, mounts its private /tmp and /dev/shm, then starts its slurmd.
# /dev/shm is node-local on real clusters, and software relies on it: vLLM decides which
# ranks share a node by opening a shared-memory segment there.
#   node-init.sh NAME STATE_DIR SLURM_CONF TMP_SIZE "SHARED_TMP_NAMES"
set -euo pipefail
name="$1" state="$2" conf="$3" tmp_size="$4" shared="$5"

hostname "$name"
# Keep a handle on the host's /tmp so chosen entries can stay shared.
hold="$state/nodes/$name/host-tmp"
mkdir -p "$hold"
mount --bind /tmp "$hold"
mount -t tmpfs -o "size=$tmp_size,mode=1777" "tmp-$name" /tmp
for entry in $shared; do
    [ -d "$hold/$entry" ] || continue
    mkdir -p "/tmp/$entry"
    mount --bind "$hold/$entry" "/tmp/$entry"
done
umount "$hold"
mount -t tmpfs -o "mode=1777" "shm-$name" /dev/shm  # tmpfs default size: half the RAM
exec slurmd -f "$conf" -N "$name"
