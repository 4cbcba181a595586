#!/bin/bash -l
#PBS -N aegis-multi
#PBS -l select=3:system=polaris
#PBS -l walltime=00:30:00
#PBS -l filesystems=home:eagle
#PBS -A MyProject
#PBS -q debug-scaling
#PBS -l place=scatter
#PBS -j oe
#PBS -o /scratch/proj/runs/20260101-000000-test/pbs.out
# Rendered by aegis 0.1.0 for site polaris: 3 nodes, 6 instances.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

# Site set-up (polaris profile), before `set -u`: module and conda activation
# scripts may read unset variables (conda/conda#3200, #8186).
module use /soft/modulefiles
module load conda
conda activate

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
export HF_HOME=/eagle/datasets/model-weights
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
