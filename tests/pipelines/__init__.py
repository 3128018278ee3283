"""Tests of pipelines: see tests/conftest.py for the map."""
