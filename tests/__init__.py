"""detailpp's tests (a package, so that tests import shared helpers as ``tests.<folder>.<module>``)."""
