"""Tests of the real multi-node Slurm test cluster (tests/cluster/start.sh)."""
