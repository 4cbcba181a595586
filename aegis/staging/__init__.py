"""Staging model weights and environments to node-local storage."""
