#!/usr/bin/env bash
# Start the desktop application: set up .venv if needed, then open the window.
# Arguments are passed on (an optional preset file to open).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m app "$@"
