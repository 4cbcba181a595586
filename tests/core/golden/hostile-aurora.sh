#!/bin/bash -l
#PBS -N aegis-x-rm--rf
#PBS -l select=1
#PBS -l walltime=01:00:00
#PBS -l filesystems=flare:home
#PBS -q debug
#PBS -l place=scatter
#PBS -j oe
#PBS -o /scratch/proj/runs/20260101-000000-test/pbs.out
# Rendered by aegis 0.1.0 for site aurora: 1 node, 1 instance.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

# Site set-up (aurora profile), before `set -u`: module and conda activation
# scripts may read unset variables (conda/conda#3200, #8186).
module load frameworks

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
# shellcheck disable=SC2016  # a literal value: quoted so that it is not expanded
export HF_HOME='/tmp/$(touch MARKER)/hf'
# shellcheck disable=SC2016  # a literal value: quoted so that it is not expanded
export AEGIS_TEST_VALUE='a'"'"'b"c`touch MARKER`$(touch MARKER) ; rm -rf ~'
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
