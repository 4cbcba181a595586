"""Modules the engines import or run themselves (this folder goes on their PYTHONPATH): standard library only
(aegis_raywait.py also imports the engine's own Ray; aegis_raystart.py looks for its client package)."""
