"""Tests of aegis bench, probe and smoke."""
