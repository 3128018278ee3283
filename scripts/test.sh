#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, lints, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's Chromium drives the browser demo's end-to-end test (Playwright uses it; nothing is downloaded).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will fail" >&2
fi
.venv/bin/ruff check src tests benchmarks scripts research
.venv/bin/ruff format --check src tests benchmarks scripts research
exec .venv/bin/python -m pytest -q -W ignore::DeprecationWarning "$@"
