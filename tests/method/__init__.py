"""Tests of method: see tests/conftest.py for the map."""
