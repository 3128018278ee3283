"""Tests of bench: see tests/conftest.py for the map."""
