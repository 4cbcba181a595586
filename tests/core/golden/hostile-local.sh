#!/bin/bash
# Rendered by aegis 0.1.0 for site local: 1 node, 1 instance.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
# shellcheck disable=SC2016  # a literal value: quoted so that it is not expanded
export HF_HOME='/tmp/$(touch MARKER)/hf'
# shellcheck disable=SC2016  # a literal value: quoted so that it is not expanded
export AEGIS_TEST_VALUE='a'"'"'b"c`touch MARKER`$(touch MARKER) ; rm -rf ~'
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
