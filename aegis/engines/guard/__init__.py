"""Modules the engines import themselves (this folder goes on their PYTHONPATH): standard library only."""
