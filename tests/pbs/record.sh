#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Record real command outputs from the running OpenPBS test complex (start.sh)
# for the parser tests: qsub, qstat -f -F json -x and plain qstat -f of jobs in
# every state aegis tells apart, qdel, and the error cases. Every file is the
# command's stdout; NAME.stderr and NAME.rc hold its stderr (when not empty)
# and exit status. The jobs run as $AEGIS_PBS_USER (qsub -u), as on a real
# site; the root-*.json files show what differs when jobs run as root.
#
#   bash tests/pbs/record.sh [OUT_DIR]     # default: tests/pbs/recorded
#
# Takes about 30 s (the SIGTERM-ignoring job is killed 10 s after its qdel).
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=record-lib.sh
source "$PBS_TESTS_DIR/record-lib.sh" record "${1:-}"

U=(-u "$JOB_USER")
# shellcheck disable=SC2016  # $(hostname) is for the job's shell
ok=$(printf 'echo hello from $(hostname)\n' | sub ok "${U[@]}")
failed=$(printf 'echo failing\nexit 3\n' | sub failed "${U[@]}")
running=$(printf 'sleep 300\n' | sub running "${U[@]}" -l select=2:ncpus=1 -l place=scatter)
deleted=$(printf 'sleep 300\n' | sub deleted "${U[@]}")
walltime=$(printf 'sleep 300\n' | sub walltime "${U[@]}" -l walltime=00:00:05)
held=$(printf 'true\n' | sub held "${U[@]}" -h)
never=$(printf 'true\n' | sub never "${U[@]}" -l select=1:ncpus=999)
stubborn=$(printf 'trap "" TERM\nsleep 300\n' | sub stubborn "${U[@]}")
root_deleted=$(printf 'sleep 300\n' | sub root-deleted)
for id in "$ok" "$failed"; do waitstate "$id" F 90; done
for id in "$running" "$deleted" "$stubborn" "$root_deleted"; do waitstate "$id" R 90; done
sleep 3   # let the moms sample the running jobs (resources_used)

rec qstat-f-json-running.json "$B/qstat" -f -F json -x "$running"
rec qstat-f-running.txt "$B/qstat" -f "$running"
rec qstat-f-json-held.json "$B/qstat" -f -F json -x "$held"
rec qstat-f-json-never-runs.json "$B/qstat" -f -F json -x "$never"
rec qstat-f-json-no-ids.json "$B/qstat" -f -F json
rec qdel-running.txt "$B/qdel" "$deleted"
rec qdel-root-running.txt "$B/qdel" "$root_deleted"
rec qdel-stubborn.txt "$B/qdel" "$stubborn"   # ignores SIGTERM: killed after kill_delay (10 s)
rec qstat-f-json-stubborn-after-qdel.json "$B/qstat" -f -F json -x "$stubborn"
rec qdel-held.txt "$B/qdel" "$held"
rec qdel-never-runs.txt "$B/qdel" "$never"
for id in "$deleted" "$root_deleted" "$held" "$never"; do waitstate "$id" F 90; done
waitstate "$walltime" F 120
waitstate "$stubborn" F 60

for pair in ok:"$ok" failed:"$failed" deleted:"$deleted" walltime:"$walltime" \
    held-deleted:"$held" never-runs-deleted:"$never" stubborn-deleted:"$stubborn"; do
    rec "qstat-f-json-${pair%%:*}.json" "$B/qstat" -f -F json -x "${pair#*:}"
    rec "qstat-fx-${pair%%:*}.txt" "$B/qstat" -f -x "${pair#*:}"
done
rec root-qstat-f-json-deleted.json "$B/qstat" -f -F json -x "$root_deleted"
rec qstat-f-json-several.json "$B/qstat" -f -F json -x "$ok" "$failed" "$running" "$walltime"
rec qstat-fx-several.txt "$B/qstat" -f -x "$ok" "$failed" "$running" "$walltime"
rec qstat-f-finished-without-x.txt "$B/qstat" -f "$ok"
rec qstat-f-json-finished-without-x.json "$B/qstat" -f -F json "$ok"
rec qstat-f-json-bare-number.json "$B/qstat" -f -F json -x "${ok%%.*}"
rec qstat-f-json-unknown.json "$B/qstat" -f -F json -x "99999.$SERVER_NAME"
rec qstat-f-json-known-and-unknown.json "$B/qstat" -f -F json -x "$ok" "99999.$SERVER_NAME"
rec qstat-f-unknown.txt "$B/qstat" -f -x "99999.$SERVER_NAME"
rec qstat-x.txt "$B/qstat" -x
rec qdel-unknown.txt "$B/qdel" "99999.$SERVER_NAME"
rec qdel-finished.txt "$B/qdel" "$ok"
rec qsub-bad-queue.txt "$B/qsub" -q nosuchqueue "$work/ok.sh"
rec qsub-over-queue-limit.txt "$B/qsub" -q debug -l walltime=02:00:00 "$work/ok.sh"
rec qstat-B.txt "$B/qstat" -B
rec pbsnodes-av.txt "$B/pbsnodes" -av
rec qstat-version.txt "$B/qstat" --version
"$B/qdel" "$running" >/dev/null 2>&1
waitstate "$running" F 60
rec qstat-f-json-multinode-deleted.json "$B/qstat" -f -F json -x "$running"
for f in "$work"/*.out; do cp "$f" "$out/job-$(basename "$f")"; done
{
    echo "ok=$ok failed=$failed running=$running deleted=$deleted walltime=$walltime"
    echo "held=$held never=$never stubborn=$stubborn root_deleted=$root_deleted"
} >"$out/job-ids.txt"
say "recorded into $out: $(tr '\n' ' ' <"$out/job-ids.txt")"
