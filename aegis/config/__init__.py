"""Configuration: the config schema, site profiles, and resolving a config against its site."""
