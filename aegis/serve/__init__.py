"""`aegis serve`: one gateway URL over a chain of jobs, each handing over to its successor before its walltime."""
