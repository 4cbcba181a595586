"""Sweeps: a base config and axes expanded into hashed configurations, each run with a bench or probe."""
