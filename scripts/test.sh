#!/usr/bin/env bash
# The whole check, as CI runs it: install, lint, type-check, the import layers, then the test suite.
# Arguments go to pytest: `scripts/test.sh -m "not slow"` is the fast inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
if command -v npm >/dev/null && [[ -f clients/node/package-lock.json ]]; then
  (cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy core/src server/src clients/python/src serve-ray/src plugins/*/src
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
