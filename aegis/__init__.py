"""aegis: serve and measure large language models on supercomputers."""
from aegis._version import __version__

__all__ = ["__version__"]
