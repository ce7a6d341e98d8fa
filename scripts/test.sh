#!/usr/bin/env bash
# The project's test command: set up, lint, run every test (the slow ones too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
