"""Tests of parsing: see tests/conftest.py for the map."""
