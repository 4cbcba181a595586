#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Record what the running OpenPBS test complex (start.sh) says about jobs that
# wait for other jobs (qsub -W depend=...) or for a time (qsub -a), for the
# parser tests: held by a dependency (H, substate 22), waiting for its
# Execution_Time (W, substate 30), run once its dependency ended, and deleted
# by the server because its dependency can never be met (afterok of a failed
# job, a job id the server does not know), and still held when its afterany
# job was deleted before it ran. Files as record.sh's (NAME, NAME.stderr, NAME.rc); the ids go to
# job-ids-deps.txt.
#
#   bash tests/pbs/record-deps.sh [OUT_DIR]     # default: tests/pbs/recorded
#
# Takes about 15 s.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=record-lib.sh
source "$PBS_TESTS_DIR/record-lib.sh" record-deps "${1:-}"

U=(-u "$JOB_USER")
later=$(date -d '+1 hour' +%Y%m%d%H%M.%S)   # qsub.1B, -a: [[[[CC]YY]MM]DD]hhmm[.SS]
parent=$(printf 'sleep 300\n' | sub parent "${U[@]}")
failing=$(printf 'exit 3\n' | sub failing "${U[@]}")
unrun=$(printf 'true\n' | sub unrun "${U[@]}" -h)
waiting=$(printf 'true\n' | sub waiting "${U[@]}" -W "depend=afterany:$parent")
begin=$(printf 'true\n' | sub begin "${U[@]}" -a "$later")
afterok_failed=$(printf 'true\n' | sub afterok-failed "${U[@]}" -W "depend=afterok:$failing")
after_unknown=$(printf 'true\n' | sub after-unknown "${U[@]}" -W "depend=afterany:99999.$SERVER_NAME")
after_unrun=$(printf 'true\n' | sub after-unrun "${U[@]}" -W "depend=afterany:$unrun")
waitstate "$parent" R 90
rec qstat-f-json-dependency-held.json "$B/qstat" -f -F json -x "$waiting"
rec qstat-f-dependency-held.txt "$B/qstat" -f -x "$waiting"
rec qstat-f-json-begin-waiting.json "$B/qstat" -f -F json -x "$begin"
rec qstat-f-begin-waiting.txt "$B/qstat" -f -x "$begin"
waitstate "$failing" F 60
waitstate "$afterok_failed" F 60
waitstate "$after_unknown" F 60
rec qstat-f-json-afterok-of-failed.json "$B/qstat" -f -F json -x "$afterok_failed"
rec qstat-fx-afterok-of-failed.txt "$B/qstat" -f -x "$afterok_failed"
rec qstat-f-json-after-unknown.json "$B/qstat" -f -F json -x "$after_unknown"
"$B/qdel" "$unrun"
waitstate "$unrun" F 60
sleep 5   # qsub.1B says it "will not run"; this server keeps it held (H, substate 22), not deleted
rec qstat-f-json-after-deleted-unrun.json "$B/qstat" -f -F json -x "$after_unrun"
"$B/qdel" "$after_unrun"
"$B/qdel" "$parent"
waitstate "$waiting" F 90
rec qstat-f-json-dependency-ran.json "$B/qstat" -f -F json -x "$waiting"
"$B/qdel" "$begin"
waitstate "$begin" F 60
rec qsub-bad-depend.txt "$B/qsub" -W depend=afterany:notajob "$work/parent.sh"
rec qsub-bad-begin.txt "$B/qsub" -a 2026-12-04T10:00 "$work/parent.sh"
grep -h -e "dependency" -e "Dependency" "$STATE"/server_logs/* >"$out/server-log-deps.txt"
{
    echo "parent=$parent failing=$failing unrun=$unrun waiting=$waiting begin=$begin"
    echo "afterok_failed=$afterok_failed after_unknown=$after_unknown after_unrun=$after_unrun"
} >"$out/job-ids-deps.txt"
say "recorded into $out: $(tr '\n' ' ' <"$out/job-ids-deps.txt")"
