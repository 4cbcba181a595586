# Set-up and helpers for the scripts that record real OpenPBS outputs (record.sh, record-deps.sh;
# sourced after lib.sh, not executed):
#   source record-lib.sh WORK_NAME [OUT_DIR]
# sets $out (OUT_DIR, default tests/pbs/recorded), $B (the PBS commands' directory) and $work (a fresh
# $STATE/shared/WORK_NAME that every node sees, for job scripts and their output files), and cds there.
# shellcheck shell=bash

out="$(realpath -m "${2:-$PBS_TESTS_DIR/recorded}")"
[ -f "$STATE/pbs.env" ] || die "the complex is not running (bash tests/pbs/start.sh)"
mkdir -p "$out"
export PBS_CONF_FILE="$PBS_CONF"
B="$PREFIX/bin"
work="$STATE/shared/$1"
rm -rf "$work"
mkdir -p "$work"
chmod 1777 "$work"
cd "$work" || exit 1

# sub NAME QSUB_ARGS... <SCRIPT: submit, keep qsub's stdout/stderr/rc, print the id.
sub() {
    local name="$1"; shift
    cat >"$work/$name.sh"
    chmod 644 "$work/$name.sh"
    "$B/qsub" -N "$name" -j oe -o "$work/$name.out" "$@" "$work/$name.sh" \
        >"$out/qsub-$name.txt" 2>"$out/qsub-$name.txt.stderr"
    echo $? >"$out/qsub-$name.txt.rc"
    [ -s "$out/qsub-$name.txt.stderr" ] || rm -f "$out/qsub-$name.txt.stderr"
    cat "$out/qsub-$name.txt"
}
state_of() {
    "$B/qstat" -f -F json -x "$1" 2>/dev/null |
        python3 -c 'import json,sys; print(next(iter(json.load(sys.stdin)["Jobs"].values()))["job_state"])' 2>/dev/null
}
# waitstate ID STATE SECONDS
waitstate() {
    local i
    for ((i = 0; i < $3 * 5; i++)); do
        [ "$(state_of "$1")" = "$2" ] && return 0
        sleep 0.2
    done
    say "timed out waiting for $1 to reach state $2 (it is $(state_of "$1"))"
    return 1
}
# rec FILE COMMAND...: stdout to FILE, stderr to FILE.stderr (if any), exit status to FILE.rc.
rec() {
    local f="$1"; shift
    "$@" >"$out/$f" 2>"$out/$f.stderr"
    echo $? >"$out/$f.rc"
    [ -s "$out/$f.stderr" ] || rm -f "$out/$f.stderr"
}
