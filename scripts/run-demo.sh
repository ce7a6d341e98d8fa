#!/usr/bin/env bash
# Set up, then train the demo LoRA headless with masked prior preservation.
# Extra arguments go to the CLI, e.g. --set training.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m modules.cli train presets/demo-prior.json "$@"
