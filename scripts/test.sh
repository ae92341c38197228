#!/usr/bin/env bash
# Run banger's whole test suite (needs scripts/install.sh first; run as root: the
# tests create network namespaces, TAP devices and loop devices, and clean them up).
# Lint and types first (seconds), then pytest with any arguments given here.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
