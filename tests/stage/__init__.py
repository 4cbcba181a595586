"""Tests of `aegis stage` (csrc/ and aegis/staging/) under a real mpirun."""
