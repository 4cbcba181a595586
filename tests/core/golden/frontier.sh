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
set -euo pipefail

# Site set-up (frontier profile)
module load PrgEnv-gnu rocm

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
export HF_HOME=/tmp/hf_home
export MIOPEN_USER_DB_PATH=/tmp/miopen
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
