#!/bin/bash
#SBATCH --job-name=aegis-multi
#SBATCH --nodes=5
#SBATCH --ntasks-per-node=1
#SBATCH --time=02:00:00
#SBATCH --account=ABC123
#SBATCH --partition=batch
#SBATCH --output=/scratch/proj/runs/20260101-000000-test/slurm-%j.out
# Rendered by aegis 0.1.0 for site frontier: 5 nodes, 12 instances.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

# Site set-up (frontier profile), before `set -u`: module and conda activation
# scripts may read unset variables (conda/conda#3200, #8186).
module load PrgEnv-gnu/8.7.0 cpe/26.03 rocm/7.1.1 rccl-net-plugin craype-accel-amd-gfx90a
export LD_LIBRARY_PATH="$CRAY_LD_LIBRARY_PATH:${LD_LIBRARY_PATH:-}"

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
export HF_HOME=/tmp/hf_home
export MIOPEN_USER_DB_PATH=/tmp/miopen
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
