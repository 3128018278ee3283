"""Tests of demo: see tests/conftest.py for the map."""
