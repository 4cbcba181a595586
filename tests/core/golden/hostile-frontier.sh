#!/bin/bash
#SBATCH --job-name=aegis-x-rm--rf
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=01:00:00
#SBATCH --partition=batch
#SBATCH --output=/scratch/proj/runs/20260101-000000-test/slurm-%j.out
# Rendered by aegis 0.1.0 for site frontier: 1 node, 1 instance.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

# Site set-up (frontier profile), before `set -u`: module and conda activation
# scripts may read unset variables (conda/conda#3200, #8186).
module load PrgEnv-gnu/8.7.0 cpe/26.03 rocm/7.1.1 rccl-net-plugin craype-accel-amd-gfx90a
export LD_LIBRARY_PATH="$CRAY_LD_LIBRARY_PATH:${LD_LIBRARY_PATH:-}"

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
# shellcheck disable=SC2016  # a literal value: quoted so that it is not expanded
export HF_HOME='/tmp/$(touch MARKER)/hf'
# shellcheck disable=SC2016  # a literal value: quoted so that it is not expanded
export AEGIS_TEST_VALUE='a'"'"'b"c`touch MARKER`$(touch MARKER) ; rm -rf ~'
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
