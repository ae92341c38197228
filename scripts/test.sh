#!/usr/bin/env bash
# Run banger's whole test suite (needs scripts/install.sh first; run as root: the
# tests create network namespaces, TAP devices and loop devices, and clean them up).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
