"""Tests of scripts: see tests/conftest.py for the map."""
