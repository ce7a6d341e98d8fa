#!/usr/bin/env bash
# The project's test command: set up, lint, run every test (the slow ones too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The UI tests drive the real window on a virtual display (Xvfb).
if ! command -v Xvfb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing Xvfb for the UI tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb >/dev/null
    else
        echo "Xvfb is missing: install it (Debian/Ubuntu: sudo apt-get install xvfb); UI tests will be skipped"
    fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two worker processes (pytest-xdist), each given whole files (a file's module fixtures are
# built once), the dearest files first (tests/conftest.py orders them), and one thread each:
# the tiny test models gain little from a second thread, and two processes nearly halve the
# time. Arguments pass through and win, e.g. -n 0 for one process.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
