#!/bin/bash
#SBATCH --job-name=aegis-glm-4.6
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=1-12:00:00
#SBATCH --account=research
#SBATCH --partition=gpu
#SBATCH --gpus-per-node=8
#SBATCH --output=/scratch/proj/runs/20260101-000000-test/slurm-%j.out
#SBATCH --exclusive
#SBATCH --qos=high
#SBATCH --constraint=h200
# Rendered by aegis 0.1.0 for site h200: 2 nodes, 1 instance.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
export HF_HOME=/tmp/hf_home
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
