#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Record what the running OpenPBS test complex (start.sh) says about its queue limits
# (set by start.sh; the same table is tests/sched/sites/testpbs.yaml's `queues:`): the queues
# as `qstat -Q -f -F json` lists them, and qsub's answer to a job outside each kind of limit
# (walltime over every queue's resources_max, more nodes than resources_max.nodect, fewer than
# prod's resources_min.nodect). Files as record.sh's (NAME, NAME.stderr, NAME.rc). Nothing runs:
# every qsub here is refused.
#
#   bash tests/pbs/record-queues.sh [OUT_DIR]     # default: tests/pbs/recorded
#
# Takes about 1 s.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=record-lib.sh
source "$PBS_TESTS_DIR/record-lib.sh" record-queues "${1:-}"

printf 'true\n' >"$work/one-node.sh"   # qsub's default: select=1, the queue's default walltime
rec qstat-Qf-json.json "$B/qstat" -Q -f -F json   # with queue names it prints only the first (as for jobs)
for q in debug workq prod; do
    rec "qsub-limit-walltime-$q.txt" "$B/qsub" -q "$q" -l walltime=48:00:00 -l select=2:ncpus=1 "$work/one-node.sh"
done
rec qsub-limit-three-nodes-workq.txt "$B/qsub" -q workq -l select=3:ncpus=1 "$work/one-node.sh"
rec qsub-limit-one-node-prod.txt "$B/qsub" -q prod -l select=1:ncpus=1 "$work/one-node.sh"
say "recorded into $out: $(cd "$out" && printf '%s ' qstat-Qf-json.json qsub-limit-*.txt)"
