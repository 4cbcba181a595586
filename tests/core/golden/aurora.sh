#!/bin/bash -l
#PBS -N aegis-llama-3.3
#PBS -l select=1
#PBS -l walltime=01:00:00
#PBS -l filesystems=flare:home
#PBS -A MyProject
#PBS -q debug
#PBS -l place=scatter
#PBS -j oe
#PBS -o /scratch/proj/runs/20260101-000000-test/pbs.out
#PBS -v HF_TOKEN
# Rendered by aegis 0.1.0 for site aurora: 1 node, 2 instances.
# The resolved config is saved beside this script; `aegis plan` on it shows the placement.
set -eo pipefail

# Site set-up (aurora profile), before `set -u`: module and conda activation
# scripts may read unset variables (conda/conda#3200, #8186).
module load frameworks

set -u

export AEGIS_RUN_DIR=/scratch/proj/runs/20260101-000000-test
export HF_HOME=/tmp/hf_home
export VLLM_LOGGING_LEVEL=INFO
cd "$AEGIS_RUN_DIR"

exec aegis launch --run-dir "$AEGIS_RUN_DIR" --site-file /scratch/proj/runs/20260101-000000-test/site.yaml /scratch/proj/runs/20260101-000000-test/config.yaml
