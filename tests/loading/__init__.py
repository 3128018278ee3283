"""Tests of loading: see tests/conftest.py for the map."""
