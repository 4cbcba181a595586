"""Site profiles shipped as package data (one YAML file per site)."""
