"""Jinja2 templates shipped as package data (job scripts, modulefile)."""
