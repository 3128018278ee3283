"""The browser demo: ``detailpp demo``."""

from detailpp.demo.page import build_demo, launch

__all__ = ["build_demo", "launch"]
