"""Scheduler backends: render, submit, status, cancel."""
